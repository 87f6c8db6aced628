//! A real learning test on the CPU: starting from a deliberately loopy SFT model (the tiny
//! model fine-tuned on demonstrations of which half repeat one command until the step
//! limit: `tests/fixtures/loopy`, made by the ignored `make_loopy_fixture` below), a few
//! minutes of stage-I RL — rollouts in the sandbox, the loop penalty and gate, GRPO — must
//! lower its looping rate and raise its mean reward. The numbers are printed.

use std::path::Path;

use protege::agent::episode::{run_episode, EpisodeConfig};
use protege::agent::policy::Replay;
use protege::agent::trajectory::{write_jsonl, Trajectory};
use protege::config::{RlConfig, SftConfig};
use protege::sandbox::{best_isolation, Limits, LocalSandbox};
use protege::tasks::load_suite;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;

const COMMANDS: [&str; 6] = ["ls", "git status", "git log --oneline", "pwd", "ls tests", "git diff"];

/// Demonstrations played through the real harness (sandbox, tools), so that their
/// observations are what the policy will see: half loop (one command repeated to the step
/// limit), the rest vary their commands and submit.
fn loopy_demonstrations(suite: &Path, n: usize, max_steps: usize) -> Vec<Trajectory> {
    let tasks = load_suite(suite).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let cfg = EpisodeConfig { max_steps, compact_prompt: true, observation_chars: 300, ..Default::default() };
    let scratch = tempfile::tempdir().unwrap();
    let isolation = best_isolation();
    (0..n)
        .map(|i| {
            let task = &tasks[i % tasks.len()];
            let loopy = rng.gen_bool(0.5);
            let mut commands: Vec<&str> = if loopy {
                let k = rng.gen_range(0..=2);
                let mut c: Vec<&str> = COMMANDS.choose_multiple(&mut rng, k).copied().collect();
                let repeated = *COMMANDS.choose(&mut rng).unwrap();
                c.resize(max_steps, repeated);
                c
            } else {
                let k = rng.gen_range(3..=5);
                COMMANDS.choose_multiple(&mut rng, k).copied().collect()
            };
            let mut replies: Vec<String> = commands
                .drain(..)
                .map(|c| Replay::call("", "bash", json!({"command": c})).trim_start().to_string())
                .collect();
            if !loopy {
                replies.push(Replay::call("", "submit", json!({})).trim_start().to_string());
            }
            let sandbox = LocalSandbox::for_task(
                task,
                &scratch.path().join(format!("ep-{i}")),
                isolation,
                Limits::default(),
                vec![],
            )
            .unwrap();
            let ep = run_episode(task, &sandbox, &mut Replay::new(replies), None, &cfg);
            sandbox.discard();
            ep.to_trajectory(None, Default::default())
        })
        .collect()
}

fn sft_config(run: &Path, demos: &Path, steps: u64) -> (SftConfig, String) {
    let text = format!(
        r#"
[model]
path = "{tiny}"
context = 2048
[data]
train = ["{demos}"]
eval_fraction = 0.0
max_seq_len = 2048
batch_tokens = 8192
[train]
steps = {steps}
seed = 0
checkpoint_every = 0
[optim]
lr = 1e-2
warmup_steps = 2
decay = "cosine"
min_lr_ratio = 0.1
beta1 = 0.9
beta2 = 0.99
eps = 1e-8
weight_decay = 0.0
max_grad_norm = 1.0
[output]
run_dir = "{run}"
"#,
        tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny").display(),
        demos = demos.display(),
        run = run.display()
    );
    let cfg: SftConfig = toml::from_str(&text).unwrap();
    cfg.validate().unwrap();
    (cfg, text)
}

/// Makes `tests/fixtures/loopy`: the tiny model fine-tuned (300 steps, ~5 minutes on 2
/// cores) on the loopy demonstrations. Run with
/// `cargo test --release --test rl_learning -- --ignored make_loopy_fixture`.
#[test]
#[ignore]
fn make_loopy_fixture() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let demos = dir.path().join("loopy.jsonl");
    let t = loopy_demonstrations(&root.join("data/tasks/train.jsonl"), 96, 10);
    let looping = t.iter().filter(|t| t.meta["exit_status"] == "step_limit").count();
    println!("{} demonstrations, {looping} of them loop to the step limit", t.len());
    write_jsonl(&demos, &t).unwrap();
    let (cfg, text) = sft_config(&dir.path().join("sft"), &demos, 300);
    let out = protege::train::sft::run_sft(&cfg, &text, false, None).unwrap();
    println!("loopy SFT: loss {:.3} -> {:.4}", out.metrics[0].loss, out.metrics.last().unwrap().loss);
    let dest = root.join("tests/fixtures/loopy");
    std::fs::create_dir_all(&dest).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(dir.path().join("sft/model").join(f), dest.join(f)).unwrap();
    }
}

#[test]
fn stage_one_rl_lowers_looping_and_raises_reward() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let suite = root.join("data/tasks/train.jsonl");
    let dir = tempfile::tempdir().unwrap();
    let max_steps = 10;
    let rl_text = format!(
        r#"
[model]
path = "{model}"
context = 2048
[grpo]
tasks_per_step = 4
group_size = 6
seed = 1
batch_tokens = 16384
recompute = false
[optim]
lr = 1e-3
warmup_steps = 0
decay = "constant"
min_lr_ratio = 1.0
beta1 = 0.9
beta2 = 0.99
eps = 1e-8
weight_decay = 0.0
max_grad_norm = 1.0
[rollout]
concurrency = 24
temperature = 1.0
max_new_tokens = 48
[rollout.episode]
max_steps = {max_steps}
context_tokens = 2048
observation_chars = 300
compact_prompt = true
[expert]
kind = "none"
[[stage]]
name = "I"
steps = 12
suite = "{suite}"
[stage.reward]
w_follow = 0.0
w_sim = 0.0
w_expert = 0.0
format_exit = -5.0
loops = {{ k1 = 3, k2 = 2, lambda = 0.5, floor = -10.0, looping_run = 4 }}
gate_loop = {{ enabled = true, half_at = 5, zero_at = 7 }}
[output]
run_dir = "{run}/rl"
"#,
        run = dir.path().display(),
        model = root.join("tests/fixtures/loopy").display(),
        suite = suite.display()
    );
    let rl_cfg: RlConfig = toml::from_str(&rl_text).unwrap();
    rl_cfg.validate().unwrap();
    let out = protege::train::rl::run_rl(&rl_cfg, &rl_text, false, None).unwrap();
    let m = &out.metrics;
    // What the policy wrote in its first episode, for the log.
    let first = protege::agent::trajectory::read_jsonl(&dir.path().join("rl/rollouts/step-1.jsonl")).unwrap();
    for msg in first[0].messages.iter().skip(2).take(4) {
        println!(
            "  first episode: {:?}: {:?} {:?}",
            msg.role,
            msg.text(),
            msg.tool_calls.first().map(|c| c.arguments())
        );
    }
    for x in m {
        println!(
            "step {}: reward {:+.3}, looping {:.0}%, longest run {:.1}, steps {:.1}, format errors {:.2}, kl {:.4}, clip {:.3}",
            x.step,
            x.reward,
            100.0 * x.looping_rate,
            x.longest_run,
            x.steps_per_episode,
            x.format_errors,
            x.kl,
            x.clip_frac
        );
    }
    let avg = |xs: &[protege::train::rl::RlMetrics], f: fn(&protege::train::rl::RlMetrics) -> f64| {
        xs.iter().map(f).sum::<f64>() / xs.len() as f64
    };
    let (first, last) = (&m[..3], &m[m.len() - 3..]);
    // Step 1's episodes are the SFT model's own (no update yet); by step 2 the policy has
    // already learned (it loops at 8-17% there in most runs).
    let (loop0, loop1) = (m[0].looping_rate, avg(last, |x| x.looping_rate));
    let (r0, r1) = (avg(first, |x| x.reward), avg(last, |x| x.reward));
    println!(
        "looping rate {:.0}% (step 1) -> {:.0}% (last three steps), mean reward {r0:+.3} -> {r1:+.3} (first three vs last three steps)",
        100.0 * loop0,
        100.0 * loop1
    );
    assert!(loop0 > 0.15, "the SFT model should loop to begin with ({:.0}%)", 100.0 * loop0);
    assert!(loop1 < loop0, "RL should lower the looping rate");
    assert!(r1 > r0, "RL should raise the mean reward");
}
