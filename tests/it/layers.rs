//! The crate's layers hold: no top-level module imports from a layer above its own and no
//! import cycle between top-level modules (tools/check_layers.py, which first checks itself
//! on a made-up crate with a cycle, an upward import and an unplaced module).

use std::process::Command;

#[test]
fn no_upward_imports_and_no_cycles() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("python3")
        .arg(format!("{root}/tools/check_layers.py"))
        .arg("--self-test")
        .current_dir(root)
        .output()
        .expect("running python3 tools/check_layers.py");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tools/check_layers.py failed:\n{text}");
    assert!(text.contains("check_layers self-test passed"), "{text}");
    assert!(text.contains("no upward imports and no import cycles"), "{text}");
}
