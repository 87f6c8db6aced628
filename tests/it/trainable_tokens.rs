//! Token rows LoRA cannot reach: a tag whose embedding / LM-head rows are untrained (equal to a
//! padding row, as `<tool_call>` in Qwen2.5-Coder-0.5B) is learned by LoRA SFT only when the
//! adapters train its rows (`lora.trainable_tokens`, PEFT's `trainable_token_indices`); the
//! start of the run warns about it; the PEFT export carries the rows and loading it gives the
//! trained model back; the rows' gradients are those of full fine-tuning.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{fixture, load, max_abs_diff};
use protege::agent::trajectory::{write_jsonl, Trajectory};
use protege::backend::cpu::CpuBackend;
use protege::chat::{Message, ToolCall};
use protege::config::SftConfig;
use protege::generate::prompt_logits;
use protege::model::export::{export_peft, load_peft};
use protege::model::lora::{Lora, LoraConfig};
use protege::model::token_rows::{TokenRows, EMBED_ROWS, HEAD_ROWS};
use protege::model::training::{Grads, TrainBatch};
use protege::model::Qwen2;
use protege::tokenizer::Tokenizer;
use protege::train::untrained::{attach_training_adapters, find_untrained, report};
use protege::train::{Decay, OptimConfig, Optimizer, Schedule};
use serde_json::json;

/// `<tool_call>`, `</tool_call>` and the tiny tokenizer's one padding id (no token uses it).
const TOOL_CALL: u32 = 453;
const END_TOOL_CALL: u32 = 454;
const PADDING: usize = 455;

/// A copy of the tiny model whose (tied) rows of `<tool_call>` and `</tool_call>` are the
/// padding row: untrained, as in Qwen2.5-Coder-0.5B.
fn untrained_copy(dir: &Path) -> PathBuf {
    let out = dir.join("base");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(fixture("tiny").join(f), out.join(f)).unwrap();
    }
    let bytes = std::fs::read(fixture("tiny/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec())).collect();
    let (_, shape, embed) = tensors.iter_mut().find(|t| t.0 == "model.embed_tokens.weight").unwrap();
    let row = shape[1] * 4; // f32
    let padding = embed[PADDING * row..(PADDING + 1) * row].to_vec();
    for id in [TOOL_CALL, END_TOOL_CALL] {
        embed[id as usize * row..(id as usize + 1) * row].copy_from_slice(&padding);
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
        })
        .collect();
    std::fs::write(out.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    out
}

fn conversation(i: usize) -> Vec<Message> {
    let mut call = Message::assistant(format!("Looking at file {i}."));
    call.tool_calls = vec![ToolCall::new("bash", json!({"command": format!("cat f{i}.py")}))];
    vec![
        Message::user(format!("Fix bug number {i}.")),
        call,
        Message::tool(format!("def f{i}(): return {i}")),
        Message::assistant(format!("Fixed f{i}.")),
    ]
}

fn trajectories() -> Vec<Trajectory> {
    (0..8)
        .map(|i| Trajectory {
            task_id: format!("task-{i}"),
            resolved: Some(true),
            expert_calls: 0,
            messages: conversation(i),
            tools: vec![],
            tokens: None,
            meta: Default::default(),
        })
        .collect()
}

/// An SFT run of 30 LoRA steps on the copy in `dir`, with `extra` lines in `[lora]`.
fn sft_config(dir: &Path, base: &Path, extra: &str) -> PathBuf {
    write_jsonl(&dir.join("train.jsonl"), &trajectories()).unwrap();
    let text = format!(
        r#"[model]
path = "{}"
[data]
train = ["train.jsonl"]
eval_fraction = 0.0
max_seq_len = 256
batch_tokens = 1024
[train]
steps = 30
seed = 1
[optim]
lr = 0.01
warmup_steps = 2
decay = "constant"
min_lr_ratio = 0.0
beta1 = 0.9
beta2 = 0.99
eps = 1e-8
weight_decay = 0.0
max_grad_norm = 1.0
[lora]
rank = 8
alpha = 16.0
targets = ["q", "k", "v", "o", "gate", "up", "down"]
{extra}
[output]
run_dir = "run"
"#,
        base.display()
    );
    let path = dir.join("sft.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The prompt of conversation 0 up to where the assistant writes `<tool_call>`.
fn before_tool_call(tok: &Tokenizer) -> Vec<u32> {
    let ids = tok.apply_chat_template(&conversation(0), &[], false).unwrap().ids;
    let at = ids.iter().position(|&t| t == TOOL_CALL).expect("the conversation has a tool call");
    ids[..at].to_vec()
}

/// The last row's logits and `p(<tool_call>)` there.
fn next_token(be: &CpuBackend, model: &Qwen2<CpuBackend>, prompt: &[u32]) -> (Vec<f32>, usize, f32) {
    let logits = prompt_logits(be, model, prompt, Some(&[prompt.len() as u32 - 1])).unwrap();
    let argmax = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
    let m = logits[argmax];
    let z: f32 = logits.iter().map(|l| (l - m).exp()).sum();
    let p = (logits[TOOL_CALL as usize] - m).exp() / z;
    (logits, argmax, p)
}

#[test]
fn lora_learns_an_untrained_tag_only_with_its_rows_trained() {
    let dir = tempfile::tempdir().unwrap();
    let base = untrained_copy(dir.path());
    let be = CpuBackend::new();
    let tok = Tokenizer::from_dir(&base).unwrap();
    let prompt = before_tool_call(&tok);

    // Found, and said at the start of `protege sft`, with the config line that fixes it.
    let found = find_untrained(&be, &Qwen2::load(&be, &base).unwrap(), &tok);
    assert_eq!(found.padding, vec![PADDING as u32]);
    assert_eq!(found.template_ids(), vec![TOOL_CALL, END_TOOL_CALL], "{found:?}");
    let plain = dir.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    let cfg = sft_config(&plain, &base, "");
    let out = Command::new(env!("CARGO_BIN_EXE_protege"))
        .args(["sft", "--device", "cpu", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("sft: WARNING: the chat template's tokens <tool_call> (453), </tool_call> (454)"),
        "{stderr}"
    );
    assert!(stderr.contains("\n    trainable_tokens = [\"<tool_call>\", \"</tool_call>\"]\n"), "{stderr}");

    // Without the rows the tag stays the padding token's twin: equal logits, so at most even odds.
    let adapter = plain.join("run/adapter");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert!(config.get("trainable_token_indices").is_none());
    let model = Qwen2::load_merged(&be, &base, Some(&adapter), None).unwrap();
    let (logits, _, p_plain) = next_token(&be, &model, &prompt);
    assert!((logits[TOOL_CALL as usize] - logits[PADDING]).abs() < 1e-5, "the rows are unchanged");
    assert!(p_plain <= 0.5, "p(<tool_call>) = {p_plain}");

    // With the rows trained ("auto" picks the two tags) the model writes the tag where it belongs.
    let rows = dir.path().join("rows");
    std::fs::create_dir_all(&rows).unwrap();
    let path = sft_config(&rows, &base, "trainable_tokens = \"auto\"");
    let cfg = SftConfig::from_file(&path).unwrap();
    let run = protege::train::sft::run_sft(&cfg, &std::fs::read_to_string(&path).unwrap(), false, None).unwrap();
    assert!(run.metrics.last().unwrap().loss < run.metrics[0].loss);
    let adapter = rows.join("run/adapter");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["trainable_token_indices"], json!({"embed_tokens": [TOOL_CALL, END_TOOL_CALL]}));
    let model = Qwen2::load_merged(&be, &base, Some(&adapter), None).unwrap();
    let (logits, argmax, p_rows) = next_token(&be, &model, &prompt);
    println!("p(<tool_call>) at the tag: {p_plain:.3} without the rows, {p_rows:.3} with them");
    assert_eq!(argmax, TOOL_CALL as usize, "greedy writes <tool_call>: p = {p_rows}");
    assert!(p_rows > 0.9, "p(<tool_call>) = {p_rows}");
    // The merged model the run wrote has the rows too.
    let merged = Qwen2::load(&be, &rows.join("run/model")).unwrap();
    let (again, _, _) = next_token(&be, &merged, &prompt);
    assert!(max_abs_diff(&again, &logits) < 1e-4);
}

fn tool_call_batch(tok: &Tokenizer, temperature: f32) -> TrainBatch {
    let seqs: Vec<(Vec<u32>, Vec<bool>)> = (0..3)
        .map(|i| {
            let enc = tok.apply_chat_template(&conversation(i), &[], false).unwrap();
            let mask = enc.assistant_mask();
            (enc.ids, mask)
        })
        .collect();
    let mut b = TrainBatch::pack(&seqs).unwrap();
    b.temperature = temperature;
    b
}

/// A LoRA config with `trainable_tokens = {tokens}` (none when empty).
fn lora_config(tokens: &str) -> LoraConfig {
    let line = if tokens.is_empty() { String::new() } else { format!("trainable_tokens = {tokens}") };
    toml::from_str(&format!("rank = 4\nalpha = 8.0\ntargets = [\"q\", \"v\", \"down\"]\n{line}")).unwrap()
}

/// The LoRA path computes only the trained rows' gradients; they must be full fine-tuning's.
#[test]
fn token_row_gradients_are_full_fine_tunings() {
    for (name, temperature) in [("tiny", 1.0), ("tiny-untied", 0.7)] {
        let (be, mut model) = load(name);
        let tok = Tokenizer::from_dir(&fixture(name)).unwrap();
        let batch = tool_call_batch(&tok, temperature);
        let dlogp = batch.nll_dlogp(batch.trained_rows() as f32);
        let mut full = Grads::zeros_for(&be, &model);
        let (_, trace) = model.train_forward(&be, &batch, false).unwrap();
        model.train_backward(&be, &batch, trace, &dlogp, &mut full).unwrap();

        // 7 is a token the batch never holds (its rows still get the head's push-down).
        let ids = [TOOL_CALL, END_TOOL_CALL, 7];
        let mut lora = Lora::init(&be, &model.cfg, &lora_config("")).unwrap();
        lora.tokens = Some(TokenRows::from_model(&be, &model, &ids));
        model.attach_lora(&be, lora);
        let mut grads = Grads::zeros_for(&be, &model);
        let (_, trace) = model.train_forward(&be, &batch, false).unwrap();
        model.train_backward(&be, &batch, trace, &dlogp, &mut grads).unwrap();

        let Grads::Full(full) = full else { unreachable!() };
        let Grads::Lora(grads) = grads else { unreachable!() };
        let h = model.cfg.hidden_size;
        let rows_of = |table: &Vec<f32>| ids.iter().flat_map(|&i| table[i as usize * h..][..h].to_vec()).collect();
        let t = grads.tokens.as_ref().unwrap();
        let mut pairs: Vec<(&str, Vec<f32>, &Vec<f32>)> = vec![("embedding", rows_of(&full.embed), &t.embed.rows)];
        if let Some(head) = &full.lm_head {
            pairs.push(("head", rows_of(head), &t.head.as_ref().unwrap().rows));
        }
        for (what, want, got) in pairs {
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = max_abs_diff(got, &want) / scale;
            assert!(scale > 0.0 && err < 1e-4, "{name} {what}: relative error {err} (max |grad| {scale})");
        }
    }
}

/// A few LoRA steps with trained rows; the PEFT export loads back to the same model, exactly.
#[test]
fn trained_rows_round_trip_through_peft() {
    for name in ["tiny", "tiny-untied"] {
        let (be, mut model) = load(name);
        let base_logits =
            prompt_logits(&be, &model, &before_tool_call(&Tokenizer::from_dir(&fixture(name)).unwrap()), None).unwrap();
        let base_embed = model.w.embed.clone();
        let tok = Tokenizer::from_dir(&fixture(name)).unwrap();
        attach_training_adapters(&be, &mut model, &tok, Some(&lora_config("[\"<tool_call>\", 454]")), "test", false)
            .unwrap();
        let batch = tool_call_batch(&tok, 1.0);
        let dlogp = batch.nll_dlogp(batch.trained_rows() as f32);
        let schedule =
            Schedule { lr: 1e-2, warmup_steps: 0, total_steps: 5, decay: Decay::Constant, min_lr_ratio: 0.0 };
        let ocfg =
            OptimConfig { schedule, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.0, max_grad_norm: Some(1.0) };
        let mut opt = Optimizer::new(&be, model.trainable(), ocfg);
        let mut grads = Grads::zeros_for(&be, &model);
        for _ in 0..5 {
            grads.zero(&be, &model.cfg);
            let (_, trace) = model.train_forward(&be, &batch, false).unwrap();
            model.train_backward(&be, &batch, trace, &dlogp, &mut grads).unwrap();
            let cfg = model.cfg.clone();
            opt.step(&be, model.trainable_mut(), grads.tensors(&cfg)).unwrap();
            model.sync_token_rows(&be);
        }
        // Only the chosen rows moved.
        let h = model.cfg.hidden_size;
        for id in 0..model.cfg.vocab_size {
            let (now, was) = (&model.w.embed[id * h..][..h], &base_embed[id * h..][..h]);
            assert_eq!(now == was, id != TOOL_CALL as usize && id != END_TOOL_CALL as usize, "{name}: row {id}");
        }
        let ids: Vec<u32> = before_tool_call(&tok).into_iter().chain([TOOL_CALL, 20, END_TOOL_CALL]).collect();
        let trained = prompt_logits(&be, &model, &ids, None).unwrap();

        let dir = tempfile::tempdir().unwrap();
        export_peft(&be, &model, "base", dir.path()).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
        let tensors = crate::common::Tensors::open(&dir.path().join("adapter_model.safetensors"));
        assert_eq!(tensors.f32s(EMBED_ROWS).1, vec![2, h]);
        if name == "tiny" {
            assert_eq!(config["trainable_token_indices"], json!({"embed_tokens": [453, 454]}));
            assert!(!tensors.has(HEAD_ROWS), "a tied head's rows are the embedding's");
        } else {
            assert_eq!(config["trainable_token_indices"], json!({"embed_tokens": [453, 454], "lm_head": [453, 454]}));
            assert_eq!(tensors.f32s(HEAD_ROWS).1, vec![2, h]);
        }
        let (_, mut fresh) = load(name);
        let lora = load_peft(&be, &fresh, dir.path()).unwrap();
        fresh.attach_lora(&be, lora);
        assert_eq!(prompt_logits(&be, &fresh, &ids, None).unwrap(), trained, "{name}: unmerged, exactly");
        let merged = Qwen2::load_merged(&be, &fixture(name), Some(dir.path()), None).unwrap();
        let err = max_abs_diff(&prompt_logits(&be, &merged, &ids, None).unwrap(), &trained);
        assert!(err < 1e-4, "{name}: merged {err}");

        // Detached, the model is the base again: its own rows are back.
        model.detach_lora(&be).unwrap();
        assert_eq!(model.w.embed, base_embed);
        let again = prompt_logits(&be, &model, &before_tool_call(&tok), None).unwrap();
        assert_eq!(again, base_logits);
    }
}

#[test]
fn bad_trainable_tokens_are_clear_errors() {
    let (be, mut model) = load("tiny");
    let tok = Tokenizer::from_dir(&fixture("tiny")).unwrap();
    let err = |tokens: &str, model: &mut Qwen2<CpuBackend>| {
        format!("{:#}", attach_training_adapters(&be, model, &tok, Some(&lora_config(tokens)), "t", false).unwrap_err())
    };
    let e = err("[\"<tool_cal>\"]", &mut model);
    assert!(e.contains("lora.trainable_tokens: \"<tool_cal>\" is not a token"), "{e}");
    let e = err("[456]", &mut model);
    assert!(e.contains("lora.trainable_tokens: token id 456 is out of range (the model's vocab_size is 456)"), "{e}");
    for (bad, said) in [
        ("\"all\"", "expected \"auto\" or a list of tokens"),
        ("[]", "the list is empty"),
        ("[-1]", "or a list of token strings and ids"),
    ] {
        let text = format!("rank = 4\nalpha = 8.0\ntargets = [\"q\"]\ntrainable_tokens = {bad}");
        let e = format!("{:#}", toml::from_str::<LoraConfig>(&text).unwrap_err());
        assert!(e.contains(said), "{bad}: {e}");
    }
    // The fixture's own rows are trained: "auto" finds nothing and trains no rows; nothing to report.
    let found = find_untrained(&be, &model, &tok);
    assert!(found.tokens.is_empty(), "{found:?}");
    assert_eq!(report(&found, None, &[], "sft"), None);
    attach_training_adapters(&be, &mut model, &tok, Some(&lora_config("\"auto\"")), "t", false).unwrap();
    assert!(model.lora.as_ref().unwrap().tokens.is_none());
}

/// The tiny model (tied, or untied) with deterministic adapters and trained rows for
/// `<|im_start|>`, `<|im_end|>` (both in the reference prompt) and `<tool_call>`.
fn with_rows(name: &str) -> (CpuBackend, Qwen2<CpuBackend>) {
    use rand::{Rng, SeedableRng};
    let (be, mut model) = load(name);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut lora = Lora::try_from_fn(&model.cfg, &lora_config(""), |_, shape| {
        Ok((0..shape.iter().product()).map(|_| rng.gen_range(-0.1f32..0.1)).collect())
    })
    .unwrap();
    // Other tokens' rows, so that the trained rows differ from the base's.
    let from = |table: &Vec<f32>, src: [usize; 3]| {
        let h = model.cfg.hidden_size;
        src.iter().flat_map(|&s| table[s * h..(s + 1) * h].to_vec()).collect::<Vec<f32>>()
    };
    let mut rows = TokenRows::from_model(&be, &model, &[451, 452, TOOL_CALL]);
    rows.embed.rows = from(&model.w.embed, [10, 20, 30]);
    if let (Some(set), Some(head)) = (rows.head.as_mut(), model.w.lm_head.as_ref()) {
        set.rows = from(head, [40, 50, 60]);
    }
    lora.tokens = Some(rows);
    model.attach_lora(&be, lora);
    (be, model)
}

/// peft (`PeftModel.from_pretrained`) loads protege's export of trained rows with the same logits.
/// The references are made from these exports and committed: `PROTEGE_KEEP_EXPORTS=/tmp/rows
/// cargo test --test it trainable_tokens::peft`, then for NAME in tiny and tiny-untied:
/// `python3 tools/check_exports.py --base tests/fixtures/NAME --adapter /tmp/rows/NAME
///  --ids-from tests/fixtures/NAME/reference.safetensors --out-dir tests/fixtures/token_rows/NAME`.
#[test]
fn exported_rows_give_peft_s_logits() {
    let keep = std::env::var("PROTEGE_KEEP_EXPORTS").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let models: Vec<_> = ["tiny", "tiny-untied"].into_iter().map(|name| (name, with_rows(name))).collect();
    for (name, (be, model)) in &models {
        let out = keep.as_ref().map_or(tmp.path().join(name), |k| k.join(name));
        export_peft(be, model, &format!("tests/fixtures/{name}"), &out).unwrap();
    }
    for (name, (be, model)) in &models {
        let ids = crate::common::Tensors::open(&fixture(&format!("{name}/reference.safetensors"))).u32s("input_ids");
        let ours = prompt_logits(be, model, &ids, None).unwrap();
        let (peft, _) = crate::common::Tensors::open(&fixture(&format!("token_rows/{name}/peft_logits.safetensors")))
            .f32s("logits");
        let err = max_abs_diff(&ours, &peft);
        println!("{name}: max |protege - peft| = {err:.2e}");
        assert!(err < 1e-4, "{name}: protege vs peft on the exported adapter with token rows: {err}");
    }
}
