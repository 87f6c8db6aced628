//! What a PEFT LoRA adapter's `adapter_config.json` means for a Qwen2 model: which linear
//! modules of which layers carry an adapter, the rank and the scale, decided as peft decides
//! them (`target_modules` as a list, a regex or `"all-linear"`, `exclude_modules`,
//! `layers_to_transform`/`layers_pattern`, rsLoRA), and a clear refusal of the variants protege
//! cannot apply (DoRA, per-module ranks or alphas, trained biases, saved modules, ...).
//! Also the tensor names of `adapter_model.safetensors`, with or without the adapter-name infix
//! (`lora_A.default.weight`) that a raw state dict carries.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use regex::Regex;
use serde_json::Value;

use super::lora::Target;

/// A LoRA adapter's settings, as protege applies them.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftLoraConfig {
    pub rank: usize,
    /// PEFT's `lora_alpha`, folded so that `alpha / rank` is the adapter's scale: an rsLoRA
    /// adapter (scale `lora_alpha / sqrt(r)`) gets `lora_alpha * sqrt(r)`.
    pub alpha: f32,
    /// `adapted[l]`: the modules of layer `l` that carry an adapter.
    pub adapted: Vec<Vec<Target>>,
}

/// peft's default `target_modules` for Qwen2 when the config has none
/// (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["qwen2"]`).
const QWEN2_DEFAULT_TARGETS: [&str; 2] = ["q_proj", "v_proj"];

/// Modules of a Qwen2 model that peft could select but protege cannot adapt.
const UNADAPTABLE: [&str; 2] = ["lm_head", "model.embed_tokens"];

impl PeftLoraConfig {
    /// Reads `path` (an `adapter_config.json`) for a model of `num_layers` layers.
    pub fn from_file(path: &Path, num_layers: usize) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let v: Value = crate::inputs::json_file(&text, &path.display().to_string())?;
        Self::from_json(&v, num_layers).map_err(|e| anyhow!("{}: {e:#}", path.display()))
    }

    /// As [`PeftLoraConfig::from_file`], from the parsed JSON; errors name the field.
    pub fn from_json(v: &Value, num_layers: usize) -> Result<Self> {
        let get = |k: &str| v.get(k).filter(|x| !x.is_null());
        match get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            Some(other) => bail!("peft_type is {other:?}; only \"LORA\" adapters are supported"),
            None => bail!("missing `peft_type` (a PEFT LoRA adapter has \"peft_type\": \"LORA\")"),
        }
        refuse_unsupported(v)?;
        let rank =
            get("r").context("missing `r`")?.as_u64().filter(|&r| r > 0).context("`r` must be a positive integer")?
                as usize;
        let mut alpha =
            get("lora_alpha").context("missing `lora_alpha`")?.as_f64().context("`lora_alpha` must be a number")?;
        if get("use_rslora").and_then(Value::as_bool) == Some(true) {
            alpha *= (rank as f64).sqrt();
        }
        let adapted = select_modules(v, num_layers)?;
        if adapted.iter().all(Vec::is_empty) {
            bail!(
                "`target_modules` (with `exclude_modules` and `layers_to_transform`) selects no module of this model"
            );
        }
        Ok(Self { rank, alpha: alpha as f32, adapted })
    }

    /// Every adapted module kind, in [`Target::ALL`] order.
    pub fn targets(&self) -> Vec<Target> {
        Target::ALL.into_iter().filter(|t| self.adapted.iter().any(|l| l.contains(t))).collect()
    }
}

/// Refuses the settings that change what the adapter computes in ways protege does not
/// implement. (`fan_in_fan_out` is accepted: peft itself ignores it on `nn.Linear`, Qwen2's
/// only adapted layer type.)
fn refuse_unsupported(v: &Value) -> Result<()> {
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    let is_true = |k: &str| get(k).and_then(Value::as_bool) == Some(true);
    let non_empty = |k: &str| match get(k) {
        None => false,
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Bool(b)) => *b,
        Some(_) => true,
    };
    if is_true("use_dora") {
        bail!("`use_dora` is true: DoRA adapters are not supported");
    }
    match get("bias").map(|b| b.as_str().unwrap_or("?")) {
        None | Some("none") => {}
        Some(b) => bail!("`bias` is {b:?}: adapters that train biases are not supported (only \"none\")"),
    }
    if is_true("lora_bias") {
        bail!("`lora_bias` is true: adapters with a bias on lora_B are not supported");
    }
    for (k, what) in [
        ("rank_pattern", "per-module ranks"),
        ("alpha_pattern", "per-module alphas"),
        ("modules_to_save", "fully trained extra modules"),
        ("layer_replication", "replicated layers"),
        ("target_parameters", "adapters on parameters"),
        ("alora_invocation_tokens", "activated LoRA"),
        // Variants of newer peft versions that change what the adapter computes.
        ("use_bdlora", "block-diagonal LoRA adapters"),
        ("arrow_config", "Arrow-routed adapters"),
        ("kasa_config", "KaSA adapters"),
        ("monteclora_config", "MonteCLoRA adapters"),
        ("velora_config", "VeLoRA adapters"),
    ] {
        if non_empty(k) {
            bail!("`{k}` is set: {what} are not supported");
        }
    }
    if is_true("use_qalora") {
        bail!("`use_qalora` is true: QA-LoRA adapters are not supported");
    }
    Ok(())
}

/// The HF module name of module `t` of layer `l` (the key peft matches targets against).
fn module_key(l: usize, t: Target) -> String {
    format!("model.layers.{l}.{}", t.module())
}

/// A `target_modules` or `exclude_modules` value: names matched as peft does (the whole key
/// or its last dotted parts), or a regex that must match the whole key.
enum Selector {
    Names(Vec<String>),
    Regex(Regex),
}

impl Selector {
    fn parse(field: &str, v: &Value) -> Result<Self> {
        Ok(match v {
            Value::String(s) => Selector::Regex(
                Regex::new(&format!("^(?:{s})$")).with_context(|| format!("`{field}` {s:?} is not a valid regex"))?,
            ),
            Value::Array(_) => Selector::Names(
                serde_json::from_value(v.clone())
                    .with_context(|| format!("`{field}` must be a list of module names or a regex string"))?,
            ),
            _ => bail!("`{field}` must be a list of module names or a regex string"),
        })
    }

    fn matches(&self, key: &str) -> bool {
        match self {
            Selector::Names(names) => names.iter().any(|n| name_matches(n, key)),
            Selector::Regex(re) => re.is_match(key),
        }
    }
}

fn name_matches(name: &str, key: &str) -> bool {
    key == name || key.ends_with(&format!(".{name}"))
}

fn select_modules(v: &Value, num_layers: usize) -> Result<Vec<Vec<Target>>> {
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    let targets = match get("target_modules") {
        None => Selector::Names(QWEN2_DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect()),
        // peft's shorthand: every linear layer but the output layer.
        Some(Value::String(s)) if s.eq_ignore_ascii_case("all-linear") => {
            Selector::Names(Target::ALL.iter().map(|t| t.peft_name().to_string()).collect())
        }
        Some(t) => Selector::parse("target_modules", t)?,
    };
    let exclude = get("exclude_modules").map(|e| Selector::parse("exclude_modules", e)).transpose()?;
    let layers = LayerFilter::parse(v, &targets)?;

    for key in UNADAPTABLE {
        if targets.matches(key) && !exclude.as_ref().is_some_and(|e| e.matches(key)) {
            bail!("`target_modules` selects {key}, which protege cannot adapt (only the linear modules of the layers)");
        }
    }
    if let Selector::Names(names) = &targets {
        let keys: Vec<String> = (0..num_layers).flat_map(|l| Target::ALL.map(|t| module_key(l, t))).collect();
        if let Some(n) = names.iter().find(|n| !keys.iter().any(|k| name_matches(n, k))) {
            bail!("unknown target module {n:?} in `target_modules` (Qwen2's are {})", peft_names().join(", "));
        }
    }
    Ok((0..num_layers)
        .map(|l| {
            Target::ALL
                .into_iter()
                .filter(|&t| {
                    let key = module_key(l, t);
                    // peft applies `layers_to_transform` only to keys a name matched by suffix.
                    let exact = matches!(&targets, Selector::Names(n) if n.contains(&key));
                    targets.matches(&key)
                        && !exclude.as_ref().is_some_and(|e| e.matches(&key))
                        && (exact || layers.keeps(&key))
                })
                .collect()
        })
        .collect())
}

fn peft_names() -> Vec<&'static str> {
    Target::ALL.iter().map(|t| t.peft_name()).collect()
}

/// `layers_to_transform` (an index or a list) with `layers_pattern`: which layers a
/// name-selected module may be in.
struct LayerFilter {
    layers: Option<BTreeSet<usize>>,
    /// Regexes finding the layer index in a module key.
    patterns: Vec<Regex>,
}

impl LayerFilter {
    fn parse(v: &Value, targets: &Selector) -> Result<Self> {
        let get = |k: &str| v.get(k).filter(|x| !x.is_null());
        let layers: Option<BTreeSet<usize>> = match get("layers_to_transform") {
            None => None,
            Some(Value::Array(a)) if a.is_empty() => None,
            Some(x) => Some(match x.as_u64() {
                Some(i) => [i as usize].into(),
                None => serde_json::from_value(x.clone())
                    .context("`layers_to_transform` must be a layer index or a list of them")?,
            }),
        };
        if layers.is_some() && matches!(targets, Selector::Regex(_)) {
            // As peft's LoraConfig refuses it.
            bail!("`layers_to_transform` cannot be used when `target_modules` is a regex string");
        }
        let names: Vec<String> = match get("layers_pattern") {
            None => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(p) => serde_json::from_value(p.clone()).context("`layers_pattern` must be a string or a list")?,
        };
        let names = if names.iter().all(|n| n.is_empty()) { vec![r"[^.]*".to_string()] } else { names };
        let patterns = names
            .iter()
            .map(|p| {
                Regex::new(&format!(r"^.*\.{p}\.(\d+)\."))
                    .with_context(|| format!("`layers_pattern` {p:?} is not a valid regex"))
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers, patterns })
    }

    fn keeps(&self, key: &str) -> bool {
        let Some(layers) = &self.layers else { return true };
        let index = self.patterns.iter().find_map(|re| re.captures(key)?.get(1)?.as_str().parse::<usize>().ok());
        index.is_some_and(|i| layers.contains(&i))
    }
}

/// The LoRA tensors of an `adapter_model.safetensors`, by their names without the adapter-name
/// infix (`...q_proj.lora_A.default.weight` is found as `...q_proj.lora_A.weight`).
pub struct AdapterTensors {
    /// canonical name -> name in the file
    names: BTreeMap<String, String>,
}

impl AdapterTensors {
    pub fn new<'a>(file: &Path, names: impl Iterator<Item = &'a str>) -> Result<Self> {
        let infix = Regex::new(r"\.(lora_[AB])\.[^.]+\.weight$").expect("valid regex");
        let mut map = BTreeMap::new();
        for name in names.filter(|n| n.contains(".lora_")) {
            let canonical = infix.replace(name, ".$1.weight").into_owned();
            if let Some(prev) = map.insert(canonical.clone(), name.to_string()) {
                bail!(
                    "{}: {prev} and {name} are the same tensor of two adapters; keep one adapter per file",
                    file.display()
                );
            }
        }
        Ok(Self { names: map })
    }

    /// Takes the tensor whose canonical name is `name`; returns its name in the file.
    pub fn take(&mut self, name: &str) -> Option<String> {
        self.names.remove(name)
    }

    /// The LoRA tensors no module took: the config does not select their module.
    pub fn check_all_taken(&self, file: &Path) -> Result<()> {
        match self.names.values().next() {
            None => Ok(()),
            Some(n) => bail!(
                "{}: tensor {n} ({} LoRA tensors in all) is not used: adapter_config.json does not select its module, \
                 or protege cannot adapt it",
                file.display(),
                self.names.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(v: Value) -> Result<PeftLoraConfig> {
        PeftLoraConfig::from_json(&v, 3)
    }

    fn base() -> Value {
        json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none",
               "use_dora": false, "use_rslora": false, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": null,
               "fan_in_fan_out": false, "layers_to_transform": null, "layers_pattern": null})
    }

    fn with(k: &str, x: Value) -> Value {
        let mut v = base();
        v[k] = x;
        v
    }

    #[test]
    fn target_modules_as_list_regex_and_all_linear() {
        let c = parse(base()).unwrap();
        assert_eq!((c.rank, c.alpha), (4, 8.0));
        assert!(c.adapted.iter().all(|l| l == &[Target::Q, Target::V]));
        let c = parse(with("target_modules", json!("all-linear"))).unwrap();
        assert!(c.adapted.iter().all(|l| l == &Target::ALL));
        let c = parse(with("target_modules", json!(r"model\.layers\.[01]\.mlp\.(up|down)_proj"))).unwrap();
        assert_eq!(c.adapted, vec![vec![Target::Up, Target::Down], vec![Target::Up, Target::Down], vec![]]);
        let c = parse(with("target_modules", json!(["self_attn.o_proj"]))).unwrap();
        assert_eq!(c.targets(), vec![Target::O]);
        // peft's default for Qwen2.
        let c = parse(with("target_modules", Value::Null)).unwrap();
        assert_eq!(c.targets(), vec![Target::Q, Target::V]);
        let mut v = with("target_modules", json!("all-linear"));
        v["exclude_modules"] = json!(["k_proj", "gate_proj"]);
        assert_eq!(parse(v).unwrap().targets(), vec![Target::Q, Target::V, Target::O, Target::Up, Target::Down]);
    }

    #[test]
    fn layers_to_transform_and_rslora() {
        let c = parse(with("layers_to_transform", json!([0, 2]))).unwrap();
        assert_eq!(c.adapted, vec![vec![Target::Q, Target::V], vec![], vec![Target::Q, Target::V]]);
        let c = parse(with("layers_to_transform", json!(1))).unwrap();
        assert_eq!(c.adapted, vec![vec![], vec![Target::Q, Target::V], vec![]]);
        let mut v = with("layers_to_transform", json!(1));
        v["layers_pattern"] = json!("h");
        assert!(format!("{:#}", parse(v).unwrap_err()).contains("selects no module"));
        let mut v = with("layers_to_transform", json!([1]));
        v["layers_pattern"] = json!(["layers"]);
        assert_eq!(parse(v).unwrap().adapted[1], vec![Target::Q, Target::V]);
        let c = parse(with("use_rslora", json!(true))).unwrap();
        // scale alpha / sqrt(r) = 8 / 2 = alpha' / r.
        assert_eq!(c.alpha / c.rank as f32, 4.0);
    }

    #[test]
    fn unsupported_settings_name_their_field() {
        for (k, x, said) in [
            ("use_dora", json!(true), "`use_dora`"),
            ("bias", json!("all"), "`bias` is \"all\""),
            ("rank_pattern", json!({"q_proj": 8}), "`rank_pattern`"),
            ("alpha_pattern", json!({"q_proj": 8}), "`alpha_pattern`"),
            ("modules_to_save", json!(["lm_head"]), "`modules_to_save`"),
            ("target_modules", json!(["q_proj", "lm_head"]), "selects lm_head"),
            ("target_modules", json!(["qkv_proj"]), "unknown target module \"qkv_proj\""),
            ("target_modules", json!("(unclosed"), "not a valid regex"),
            ("peft_type", json!("IA3"), "peft_type"),
            ("r", json!(0), "`r`"),
        ] {
            let e = format!("{:#}", parse(with(k, x)).unwrap_err());
            assert!(e.contains(said), "{k}: {e}");
        }
        let mut v = with("target_modules", json!(".*q_proj"));
        v["layers_to_transform"] = json!([0]);
        assert!(format!("{:#}", parse(v).unwrap_err()).contains("`layers_to_transform`"));
    }

    #[test]
    fn adapter_name_infix_is_optional() {
        let names =
            ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", "x.lora_B.weight", "other"];
        let mut t = AdapterTensors::new(Path::new("f"), names.into_iter()).unwrap();
        assert_eq!(t.take("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").as_deref(), Some(names[0]));
        assert!(t.check_all_taken(Path::new("f")).unwrap_err().to_string().contains("x.lora_B.weight"));
        assert_eq!(t.take("x.lora_B.weight").as_deref(), Some("x.lora_B.weight"));
        t.check_all_taken(Path::new("f")).unwrap();
    }
}
