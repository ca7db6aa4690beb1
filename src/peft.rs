//! Reading and writing Hugging Face PEFT LoRA adapter directories for a tied
//! embedding / LM head.
//!
//! A PEFT adapter directory holds `adapter_config.json` and
//! `adapter_model.safetensors`. For LoRA on a tied model saved with
//! `ensure_weight_tying=True`, the safetensors file holds the same two factors
//! twice, once per view of the tied weight (DESIGN.md §2):
//!
//! | key | PEFT shape | here |
//! |---|---|---|
//! | `base_model.model.<module>.lora_embedding_A` | [r, V] | `lora_vocab`ᵀ |
//! | `base_model.model.<module>.lora_embedding_B` | [d, r] | `lora_hidden`ᵀ |
//! | `base_model.model.lm_head.lora_A.weight` | [r, d] | `lora_hidden` |
//! | `base_model.model.lm_head.lora_B.weight` | [V, r] | `lora_vocab` |
//!
//! `<module>` is the embedding's module path in the base model:
//! `model.embed_tokens` (Llama, Qwen2, Gemma) or `transformer.wte` (GPT-2).
//! [`PeftAdapter::read`] finds it; [`PeftAdapter::read_with_module`] takes it
//! from the caller. [`PeftAdapter::write`] writes both views as F32 and a config
//! that `PeftModel.from_pretrained` loads into a tied model
//! (`scripts/peft_check.py` checks that with PEFT itself, for Llama and GPT-2).
//!
//! The written `target_modules` is `[<module>, its last component, "lm_head"]`,
//! e.g. `["transformer.wte", "wte", "lm_head"]`. The head must be listed: PEFT
//! (0.21) ties the head's adapter to the embedding's only if a `target_modules`
//! entry ends in one of its embedding layer names (`embed_tokens`, `lm_head`).
//! `wte` is not one of them, so a GPT-2 adapter listing only
//! `["transformer.wte", "wte"]` reloads with LoRA on the embedding and none on
//! `lm_head` (the head keys are dropped as unexpected). With `lm_head` listed,
//! PEFT puts the adapter on the embedding and ties the head to it (Llama and
//! GPT-2 alike); on an untied model the head gets its own LoRA, loaded from the
//! head keys. The head module is `lm_head` in every supported family
//! ([`HEAD_MODULE`]). [`PeftAdapter::read`] accepts either form (and any other
//! `target_modules`: it finds the factors by their keys).
//!
//! ```
//! use tiedlora::peft::PeftAdapter;
//! use tiedlora::LoraConfig;
//!
//! let cfg = LoraConfig::builder(64, 16, 4).alpha(8.0).build()?;
//! let u: Vec<f32> = (0..64 * 4).map(|i| i as f32 * 1e-3).collect(); // lora_vocab [V, r]
//! let vh: Vec<f32> = (0..4 * 16).map(|i| 1.0 - i as f32 * 1e-2).collect(); // lora_hidden [r, d]
//! let adapter = PeftAdapter::new(&cfg, u, vh, "model.embed_tokens")?;
//!
//! let dir = std::env::temp_dir().join(format!("tiedlora-peft-doc-{}", std::process::id()));
//! adapter.write(&dir)?;
//! let back = PeftAdapter::read(&dir)?;
//! assert_eq!(back.embedding_module(), "model.embed_tokens");
//! assert_eq!(back.scale(), 2.0);
//! assert_eq!(back.lora_vocab, adapter.lora_vocab);
//!
//! // The caller adds what PEFT does not record (embed_scale, softcap, loss options).
//! let cfg = back.config_builder().build()?;
//! assert_eq!((cfg.vocab(), cfg.hidden(), cfg.rank()), (64, 16, 4));
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), tiedlora::Error>(())
//! ```

use crate::config::{LoraConfig, LoraConfigBuilder};
use crate::error::{Error, Result};
use crate::io::{write_f32, TensorFile};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// File name of the adapter config inside an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter weights inside an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Prefix PEFT gives every tensor key of a `PeftModel` (`base_model` is the
/// `LoraModel`, `model` the wrapped transformers model).
pub const KEY_PREFIX: &str = "base_model.model.";
/// Embedding module paths [`PeftAdapter::read`] looks for first, in order:
/// Llama / Qwen2 / Gemma, then GPT-2.
pub const KNOWN_EMBEDDING_MODULES: &[&str] = &["model.embed_tokens", "transformer.wte"];
/// The tied output projection's module path (the same in all the models above:
/// `GPT2LMHeadModel`, `LlamaForCausalLM`, `Qwen2ForCausalLM`, `GemmaForCausalLM`).
/// [`PeftAdapter::write`] lists it in `target_modules`.
pub const HEAD_MODULE: &str = "lm_head";
/// Key of the head's `lora_A` ([r, d] = `lora_hidden`).
pub const HEAD_A_KEY: &str = "base_model.model.lm_head.lora_A.weight";
/// Key of the head's `lora_B` ([V, r] = `lora_vocab`).
pub const HEAD_B_KEY: &str = "base_model.model.lm_head.lora_B.weight";

/// PEFT's `LoraConfig` defaults, used when the json leaves a field out (as PEFT does).
const PEFT_DEFAULT_R: usize = 8;
const PEFT_DEFAULT_ALPHA: f64 = 8.0;

/// Key of the embedding's `lora_embedding_A` ([r, V] = `lora_vocab`ᵀ) for `module`.
pub fn embedding_a_key(module: &str) -> String {
    format!("{KEY_PREFIX}{module}.lora_embedding_A")
}

/// Key of the embedding's `lora_embedding_B` ([d, r] = `lora_hidden`ᵀ) for `module`.
pub fn embedding_b_key(module: &str) -> String {
    format!("{KEY_PREFIX}{module}.lora_embedding_B")
}

/// Which views of the tied weight an adapter file held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoredViews {
    /// Embedding and head keys, checked equal (what PEFT writes with
    /// `ensure_weight_tying=True`, and what [`PeftAdapter::write`] writes).
    Both,
    /// Only `lora_embedding_A` / `lora_embedding_B`.
    EmbeddingOnly,
    /// Only `lm_head.lora_A` / `lora_B`; the factors were taken from the head.
    HeadOnly,
}

/// A LoRA adapter on a tied embedding / LM head, in this crate's layout
/// (`lora_vocab` U [V, r], `lora_hidden` Vh [r, d], f32), plus the PEFT config
/// fields that matter for the math.
///
/// Build one with [`PeftAdapter::new`] from trained factors, or read one with
/// [`PeftAdapter::read`]; see the [module docs](self) for the key layout and an
/// example.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftAdapter {
    /// U [V, r] row-major = PEFT `lora_embedding_A`ᵀ = lm_head `lora_B.weight`.
    pub lora_vocab: Vec<f32>,
    /// Vh [r, d] row-major = PEFT `lora_embedding_B`ᵀ = lm_head `lora_A.weight`.
    pub lora_hidden: Vec<f32>,
    vocab: usize,
    hidden: usize,
    rank: usize,
    alpha: f64,
    use_rslora: bool,
    embedding_module: String,
    target_modules: Vec<String>,
    base_model_name_or_path: String,
    views: StoredViews,
    ignored_tensors: Vec<String>,
}

impl PeftAdapter {
    /// An adapter holding `lora_vocab` [V, r] and `lora_hidden` [r, d] for the
    /// shapes, `alpha` and `use_rslora` of `cfg`, on the embedding module
    /// `embedding_module` (e.g. `"model.embed_tokens"`, `"transformer.wte"`).
    ///
    /// `target_modules` becomes `[embedding_module, its last component, "lm_head"]`
    /// (what [`write`](Self::write) writes; see the [module docs](self) for why the
    /// head is listed); `base_model_name_or_path` starts empty.
    ///
    /// Errors: [`Error::BufferLength`] if a buffer does not match `cfg`,
    /// [`Error::InvalidConfig`] if a factor holds a non-finite value or the
    /// module path is not a dotted path of non-empty names.
    pub fn new(
        cfg: &LoraConfig,
        lora_vocab: Vec<f32>,
        lora_hidden: Vec<f32>,
        embedding_module: impl Into<String>,
    ) -> Result<Self> {
        let embedding_module = embedding_module.into();
        validate_module(&embedding_module)?;
        let adapter = PeftAdapter {
            lora_vocab,
            lora_hidden,
            vocab: cfg.vocab(),
            hidden: cfg.hidden(),
            rank: cfg.rank(),
            alpha: cfg.alpha(),
            use_rslora: cfg.use_rslora(),
            target_modules: default_target_modules(&embedding_module),
            embedding_module,
            base_model_name_or_path: String::new(),
            views: StoredViews::Both,
            ignored_tensors: Vec::new(),
        };
        adapter.check_factors()?;
        Ok(adapter)
    }

    /// Reads the PEFT adapter directory `dir` (`adapter_config.json` +
    /// `adapter_model.safetensors`), finding the embedding module itself.
    ///
    /// The embedding keys `base_model.model.<module>.lora_embedding_A/_B` are
    /// looked up for the [`KNOWN_EMBEDDING_MODULES`]; if none of those is in the
    /// file, the one `<module>` that has a `lora_embedding_A` is used (more than
    /// one is an error: name it with [`read_with_module`](Self::read_with_module)).
    /// If the file has no embedding keys at all, the factors come from the
    /// `lm_head` keys and the module is the first known path listed in
    /// `target_modules`, else `model.embed_tokens`.
    ///
    /// When both views are present they must be equal (see [`Error::NotTied`]):
    /// the head factors are compared with the transposed embedding factors
    /// **exactly**, after widening both to f64. PEFT with
    /// `ensure_weight_tying=True` saves one shared parameter under both keys, so
    /// the stored bytes are identical and any difference at all means two
    /// separately trained adapters (e.g. the tie broke in a bf16 model); a
    /// tolerance would only hide that, and loading such a file as one adapter
    /// would silently change one of the two paths.
    ///
    /// From the json: `r` and `lora_alpha` (PEFT's defaults 8 and 8 if absent,
    /// overridden by a `rank_pattern` / `alpha_pattern` entry that matches the
    /// module as PEFT matches it) and `use_rslora`. `r` must equal the rank of
    /// the tensors. DoRA (`use_dora`) and `lora_bias` adapters are refused.
    /// Factors are rounded once to f32 and must be finite there.
    ///
    /// Errors (never panics): [`Error::File`] naming the path for a missing
    /// directory or file, bad json, a missing tensor, a non-finite value or an
    /// unsupported config; [`Error::UnsupportedDtype`] for a non-float tensor;
    /// [`Error::ShapeMismatch`] for shapes that disagree with each other or with
    /// `r`; [`Error::NotTied`] naming the tensor and the largest difference.
    pub fn read(dir: impl AsRef<Path>) -> Result<Self> {
        read_impl(dir.as_ref(), None)
    }

    /// Like [`read`](Self::read), with the embedding's module path given by the
    /// caller (e.g. `"model.language_model.embed_tokens"`); its keys are
    /// `base_model.model.<module>.lora_embedding_A/_B`. A file with only the
    /// `lm_head` keys is accepted and recorded under `module`.
    pub fn read_with_module(dir: impl AsRef<Path>, module: &str) -> Result<Self> {
        validate_module(module)?;
        read_impl(dir.as_ref(), Some(module))
    }

    /// Writes the adapter to `dir` (created if needed): `adapter_model.safetensors`
    /// with F32 tensors under both the embedding and the head keys (see the
    /// [module docs](self)), and an `adapter_config.json` that PEFT's
    /// `PeftModel.from_pretrained` loads into a tied model (`peft_type` LORA,
    /// `ensure_weight_tying` true, `target_modules` =
    /// `[module, last component, "lm_head"]` whatever [`target_modules`](Self::target_modules)
    /// holds, no dropout, no bias, `task_type` CAUSAL_LM). Existing files are replaced.
    ///
    /// Errors: [`Error::BufferLength`] / [`Error::InvalidConfig`] if the public
    /// factor buffers were changed to a wrong length or a non-finite value,
    /// [`Error::File`] if the directory or a file cannot be written.
    pub fn write(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.check_factors()?;
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, format!("cannot create directory: {e}")))?;
        let (v, d, r) = (self.vocab, self.hidden, self.rank);
        let emb_a = transpose(&self.lora_vocab, v, r); // [r, V]
        let emb_b = transpose(&self.lora_hidden, r, d); // [d, r]
        let a_key = embedding_a_key(&self.embedding_module);
        let b_key = embedding_b_key(&self.embedding_module);
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_f32(
            dir.join(WEIGHTS_FILE),
            &[
                (a_key.as_str(), vec![r, v], &emb_a),
                (b_key.as_str(), vec![d, r], &emb_b),
                (HEAD_A_KEY, vec![r, d], &self.lora_hidden),
                (HEAD_B_KEY, vec![v, r], &self.lora_vocab),
            ],
            Some(metadata),
        )?;
        let config_path = dir.join(CONFIG_FILE);
        let text = serde_json::to_string_pretty(&self.config_json())
            .map_err(|e| file_err(&config_path, format!("cannot serialise config: {e}")))?;
        std::fs::write(&config_path, text + "\n").map_err(|e| file_err(&config_path, e))
    }

    /// A [`LoraConfig`] builder with this adapter's vocab, hidden size, rank,
    /// alpha and rsLoRA flag; add `embed_scale`, `logit_softcap`, loss options
    /// and call `build()`.
    pub fn config_builder(&self) -> LoraConfigBuilder {
        LoraConfig::builder(self.vocab, self.hidden, self.rank).alpha(self.alpha).use_rslora(self.use_rslora)
    }

    /// V: rows of `lora_vocab`.
    pub fn vocab(&self) -> usize {
        self.vocab
    }
    /// d: columns of `lora_hidden`.
    pub fn hidden(&self) -> usize {
        self.hidden
    }
    /// r: the LoRA rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// PEFT's `lora_alpha` (after any `alpha_pattern` entry for the module).
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
    /// Whether the scale is `alpha / sqrt(r)` (rsLoRA).
    pub fn use_rslora(&self) -> bool {
        self.use_rslora
    }
    /// The LoRA scale s: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        crate::config::lora_scale(self.alpha, self.rank, self.use_rslora)
    }
    /// The embedding's module path in the base model, e.g. `model.embed_tokens`.
    pub fn embedding_module(&self) -> &str {
        &self.embedding_module
    }
    /// `target_modules` as the json gave it (for [`new`](Self::new):
    /// `[module, last component, "lm_head"]`). [`write`](Self::write) always writes
    /// `[embedding_module, its last component, "lm_head"]`, since it writes only the
    /// embedding and head factors, so an adapter read from a config without
    /// `lm_head` gains it when written.
    pub fn target_modules(&self) -> &[String] {
        &self.target_modules
    }
    /// The json's `base_model_name_or_path` (empty if unset).
    pub fn base_model_name_or_path(&self) -> &str {
        &self.base_model_name_or_path
    }
    /// Sets the `base_model_name_or_path` that [`write`](Self::write) records.
    pub fn set_base_model_name_or_path(&mut self, name: impl Into<String>) {
        self.base_model_name_or_path = name.into();
    }
    /// Builder-style [`set_base_model_name_or_path`](Self::set_base_model_name_or_path).
    pub fn with_base_model_name_or_path(mut self, name: impl Into<String>) -> Self {
        self.set_base_model_name_or_path(name);
        self
    }
    /// Which views the file held ([`StoredViews::Both`] for [`new`](Self::new)).
    pub fn stored_views(&self) -> StoredViews {
        self.views
    }
    /// Tensors in the file that are not the embedding or head LoRA factors (for
    /// example LoRA on attention layers, or `modules_to_save` copies); they are
    /// not part of this adapter and [`write`](Self::write) does not write them.
    pub fn ignored_tensors(&self) -> &[String] {
        &self.ignored_tensors
    }

    fn check_factors(&self) -> Result<()> {
        let (v, d, r) = (self.vocab, self.hidden, self.rank);
        if self.lora_vocab.len() != v * r {
            return Err(Error::len("lora_vocab", v * r, self.lora_vocab.len(), format!("[V={v}, r={r}]")));
        }
        if self.lora_hidden.len() != r * d {
            return Err(Error::len("lora_hidden", r * d, self.lora_hidden.len(), format!("[r={r}, d={d}]")));
        }
        for (field, values) in [("lora_vocab", &self.lora_vocab), ("lora_hidden", &self.lora_hidden)] {
            if let Some((i, x)) = values.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                return Err(Error::InvalidConfig {
                    field,
                    value: format!("{x} at index {i}"),
                    reason: "LoRA factors must be finite",
                });
            }
        }
        Ok(())
    }

    fn config_json(&self) -> Value {
        // PEFT writes integral alphas as ints (`"lora_alpha": 8`); keep that form.
        let alpha = if self.alpha.fract() == 0.0 && self.alpha.abs() < 9.0e15 {
            json!(self.alpha as i64)
        } else {
            json!(self.alpha)
        };
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.rank,
            "lora_alpha": alpha,
            "use_rslora": self.use_rslora,
            "target_modules": default_target_modules(&self.embedding_module),
            "ensure_weight_tying": true,
            "lora_dropout": 0.0,
            "bias": "none",
            "lora_bias": false,
            "init_lora_weights": true,
            "fan_in_fan_out": false,
            "modules_to_save": null,
            "inference_mode": true,
            "use_dora": false,
            "rank_pattern": {},
            "alpha_pattern": {},
            "layers_to_transform": null,
            "layers_pattern": null,
            "exclude_modules": null,
            "revision": null,
        })
    }
}

/// `[module, last component, "lm_head"]`, without repeats (`[module, "lm_head"]`
/// if it has no dot). The head is listed so that PEFT ties it for any embedding
/// name (see the module docs).
fn default_target_modules(module: &str) -> Vec<String> {
    let last = module.rsplit('.').next().unwrap_or(module);
    let mut targets = vec![module.to_string()];
    for t in [last, HEAD_MODULE] {
        if !targets.iter().any(|x| x == t) {
            targets.push(t.to_string());
        }
    }
    targets
}

fn validate_module(module: &str) -> Result<()> {
    let ok = !module.is_empty()
        && module
            .split('.')
            .all(|part| !part.is_empty() && part.chars().all(|c| !c.is_whitespace() && !c.is_control()));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidConfig {
            field: "embedding_module",
            value: format!("{module:?}"),
            reason: "must be a dotted module path of non-empty names, e.g. `model.embed_tokens`",
        })
    }
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::File { path: path.display().to_string(), reason: reason.to_string() }
}

/// `src` [rows, cols] row-major, transposed to [cols, rows].
fn transpose<T: Copy>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    (0..cols).flat_map(|c| (0..rows).map(move |r| src[r * cols + c])).collect()
}

/// The fields of `adapter_config.json` this reader uses.
struct JsonConfig {
    r: usize,
    alpha: f64,
    use_rslora: bool,
    target_modules: Vec<String>,
    base_model_name_or_path: String,
    rank_pattern: Vec<(String, Value)>,
    alpha_pattern: Vec<(String, Value)>,
}

impl JsonConfig {
    fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| file_err(path, format!("invalid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(file_err(path, "expected a JSON object"));
        };
        let err = |reason: String| file_err(path, reason);
        let present = |key: &str| obj.get(key).filter(|v| !v.is_null());

        match present("peft_type") {
            Some(Value::String(t)) if t.eq_ignore_ascii_case("lora") => {}
            Some(other) => return Err(err(format!("`peft_type` is {other}, only \"LORA\" adapters are supported"))),
            None => return Err(err("`peft_type` is missing (not a PEFT adapter config?)".into())),
        }
        let flag = |key: &str| -> Result<bool> {
            match present(key) {
                None => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(err(format!("`{key}` must be true or false, got {other}"))),
            }
        };
        if flag("use_dora")? {
            return Err(err("DoRA adapters (`use_dora: true`) are not supported".into()));
        }
        if flag("lora_bias")? {
            return Err(err("`lora_bias: true` adapters are not supported".into()));
        }
        let use_rslora = flag("use_rslora")?;
        let r = match present("r") {
            None => PEFT_DEFAULT_R,
            Some(v) => parse_rank(v).map_err(|why| err(format!("`r` {why}")))?,
        };
        let alpha = match present("lora_alpha") {
            None => PEFT_DEFAULT_ALPHA,
            Some(v) => parse_alpha(v).map_err(|why| err(format!("`lora_alpha` {why}")))?,
        };
        let target_modules = match present("target_modules") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|x| x.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| err("`target_modules` must be a string or a list of strings".into()))?,
            Some(other) => return Err(err(format!("`target_modules` must be a string or a list, got {other}"))),
        };
        let base_model_name_or_path = match present("base_model_name_or_path") {
            None => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(err(format!("`base_model_name_or_path` must be a string, got {other}"))),
        };
        let pattern = |key: &str| -> Result<Vec<(String, Value)>> {
            match present(key) {
                None => Ok(Vec::new()),
                Some(Value::Object(m)) => Ok(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
                Some(other) => Err(err(format!("`{key}` must be an object, got {other}"))),
            }
        };
        Ok(JsonConfig {
            r,
            alpha,
            use_rslora,
            target_modules,
            base_model_name_or_path,
            rank_pattern: pattern("rank_pattern")?,
            alpha_pattern: pattern("alpha_pattern")?,
        })
    }

    /// `r` and `lora_alpha` for `module`, after `rank_pattern` / `alpha_pattern`.
    fn rank_alpha_for(&self, path: &Path, module: &str) -> Result<(usize, f64)> {
        let mut r = self.r;
        let mut alpha = self.alpha;
        if let Some((key, v)) = find_pattern(path, "rank_pattern", &self.rank_pattern, module)? {
            r = parse_rank(v).map_err(|why| file_err(path, format!("`rank_pattern[{key:?}]` {why}")))?;
        }
        if let Some((key, v)) = find_pattern(path, "alpha_pattern", &self.alpha_pattern, module)? {
            alpha = parse_alpha(v).map_err(|why| file_err(path, format!("`alpha_pattern[{key:?}]` {why}")))?;
        }
        Ok((r, alpha))
    }
}

fn parse_rank(v: &Value) -> std::result::Result<usize, String> {
    match v.as_u64() {
        Some(r) if r >= 1 && r <= crate::config::MAX_DIM as u64 => Ok(r as usize),
        _ => Err(format!("must be a positive integer, got {v}")),
    }
}

fn parse_alpha(v: &Value) -> std::result::Result<f64, String> {
    match v.as_f64() {
        Some(a) if a.is_finite() => Ok(a),
        _ => Err(format!("must be a finite number, got {v}")),
    }
}

/// The first `patterns` entry that matches `module` the way PEFT's
/// `get_pattern_key` does: `re.match(rf"(.*\.)?({key})$", module)`. Keys made of
/// names, digits, `_`, `-` and `.` (a regex wildcard) are matched exactly so;
/// a key with other regex syntax is refused rather than guessed at.
fn find_pattern<'a>(
    path: &Path,
    field: &str,
    patterns: &'a [(String, Value)],
    module: &str,
) -> Result<Option<(&'a str, &'a Value)>> {
    for (key, value) in patterns {
        if !key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) {
            return Err(file_err(
                path,
                format!("`{field}` key {key:?} uses regex syntax this reader does not interpret"),
            ));
        }
        let key_chars: Vec<char> = key.chars().collect();
        let mod_chars: Vec<char> = module.chars().collect();
        let matches_at = |start: usize| {
            mod_chars.len() - start == key_chars.len()
                && key_chars.iter().zip(&mod_chars[start..]).all(|(k, m)| *k == '.' || k == m)
        };
        let hit = (0..=mod_chars.len()).any(|start| (start == 0 || mod_chars[start - 1] == '.') && matches_at(start));
        if hit && !key.is_empty() {
            return Ok(Some((key.as_str(), value)));
        }
    }
    Ok(None)
}

/// A 2-D factor widened to f64, checked finite and representable in f32.
struct Factor {
    key: String,
    values: Vec<f64>,
    rows: usize,
    cols: usize,
}

fn load_factor(file: &TensorFile, key: &str) -> Result<Factor> {
    let (values, shape) = file.f64(key)?;
    let &[rows, cols] = shape.as_slice() else {
        return Err(Error::ShapeMismatch(format!(
            "{}: tensor `{key}` has shape {shape:?}, expected 2 dimensions",
            file.path().display()
        )));
    };
    if let Some((i, x)) = values.iter().enumerate().find(|(_, x)| !(**x as f32).is_finite()) {
        let what = if x.is_finite() { "overflows f32" } else { "is not finite" };
        return Err(file.err(format!("tensor `{key}` value {x} at [{}, {}] {what}", i / cols.max(1), i % cols.max(1))));
    }
    Ok(Factor { key: key.to_string(), values, rows, cols })
}

fn shape_err(file: &TensorFile, what: String) -> Error {
    Error::ShapeMismatch(format!("{}: {what}", file.path().display()))
}

/// Checks `a` [m, n] == `bt`ᵀ where `bt` is [n, m], exactly; `NotTied` otherwise.
fn check_transposed_equal(a: &Factor, bt: &Factor) -> Result<()> {
    let (m, n) = (a.rows, a.cols);
    let mut worst: Option<(f64, usize, usize)> = None;
    let mut diff2 = 0.0f64;
    let mut ref2 = 0.0f64;
    for i in 0..m {
        for j in 0..n {
            let x = a.values[i * n + j];
            let y = bt.values[j * m + i];
            let d = (x - y).abs();
            diff2 += d * d;
            ref2 += y * y;
            if x != y && worst.is_none_or(|(w, _, _)| d > w) {
                worst = Some((d, i, j));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some((d, i, j)) => Err(Error::NotTied(format!(
            "`{}` differs from `{}`ᵀ: max |difference| = {d:e} at [{i}, {j}] (relative norm {:e}); \
             the head and embedding adapters were not trained as one tied adapter",
            a.key,
            bt.key,
            diff2.sqrt() / ref2.sqrt().max(f64::MIN_POSITIVE)
        ))),
    }
}

fn read_impl(dir: &Path, explicit_module: Option<&str>) -> Result<PeftAdapter> {
    if !dir.is_dir() {
        let why = if dir.exists() {
            "is not a directory (expected a PEFT adapter directory)"
        } else {
            "adapter directory does not exist"
        };
        return Err(file_err(dir, why));
    }
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        return Err(file_err(&config_path, "missing: a PEFT adapter directory needs adapter_config.json"));
    }
    let json = JsonConfig::read(&config_path)?;
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.is_file() {
        let why = if dir.join("adapter_model.bin").is_file() {
            "missing; only adapter_model.bin (a PyTorch pickle) is present: re-save it with \
             `save_pretrained(..., safe_serialization=True)`"
        } else {
            "missing: a PEFT adapter directory needs adapter_model.safetensors"
        };
        return Err(file_err(&weights_path, why));
    }
    let file = TensorFile::open(&weights_path)?;
    let names = file.names();

    // Which embedding module, and does the file hold its keys?
    let (module, has_embedding) = match explicit_module {
        Some(m) => {
            let has = file.contains(&embedding_a_key(m)) || file.contains(&embedding_b_key(m));
            if !has {
                // Head-only files are fine; a file with another module's embedding keys
                // means the caller named the wrong module.
                let others = embedding_modules_in(&names);
                if !others.is_empty() {
                    return Err(file.err(format!(
                        "no `{}`; the file holds LoRA embedding tensors for {others:?}",
                        embedding_a_key(m)
                    )));
                }
            }
            (m.to_string(), has)
        }
        None => match detect_module(&file, &names)? {
            Some(m) => (m, true),
            None => (guess_module(&json.target_modules), false),
        },
    };
    let has_head = file.contains(HEAD_A_KEY) || file.contains(HEAD_B_KEY);

    let emb = if has_embedding {
        let a = load_factor(&file, &embedding_a_key(&module))?; // [r, V]
        let b = load_factor(&file, &embedding_b_key(&module))?; // [d, r]
        if b.cols != a.rows {
            return Err(shape_err(
                &file,
                format!(
                    "`{}` is [{}, {}] ([r, V]) but `{}` is [{}, {}] ([d, r]): ranks differ",
                    a.key, a.rows, a.cols, b.key, b.rows, b.cols
                ),
            ));
        }
        Some((a, b))
    } else {
        None
    };
    let head = if has_head {
        let a = load_factor(&file, HEAD_A_KEY)?; // [r, d]
        let b = load_factor(&file, HEAD_B_KEY)?; // [V, r]
        if b.cols != a.rows {
            return Err(shape_err(
                &file,
                format!(
                    "`{}` is [{}, {}] ([r, d]) but `{}` is [{}, {}] ([V, r]): ranks differ",
                    a.key, a.rows, a.cols, b.key, b.rows, b.cols
                ),
            ));
        }
        Some((a, b))
    } else {
        None
    };

    // Factors in this crate's layout, rounded once to f32.
    let to_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let from_embedding = |ea: &Factor, eb: &Factor| {
        let (r, v, d) = (ea.rows, ea.cols, eb.rows);
        (to_f32(&transpose(&ea.values, r, v)), to_f32(&transpose(&eb.values, d, r)))
    };
    let (vocab, hidden, rank, views, rank_key, (lora_vocab, lora_hidden)) = match (&emb, &head) {
        (Some((ea, eb)), Some((ha, hb))) => {
            // head lora_A [r, d] vs lora_embedding_B [d, r]; head lora_B [V, r] vs lora_embedding_A [r, V].
            if (ha.rows, ha.cols) != (eb.cols, eb.rows) || (hb.rows, hb.cols) != (ea.cols, ea.rows) {
                return Err(shape_err(
                    &file,
                    format!(
                        "head factors `{}` [{}, {}] and `{}` [{}, {}] are not the transposes of \
                         the embedding factors `{}` [{}, {}] and `{}` [{}, {}]",
                        ha.key,
                        ha.rows,
                        ha.cols,
                        hb.key,
                        hb.rows,
                        hb.cols,
                        eb.key,
                        eb.rows,
                        eb.cols,
                        ea.key,
                        ea.rows,
                        ea.cols
                    ),
                ));
            }
            check_transposed_equal(hb, ea)?;
            check_transposed_equal(ha, eb)?;
            (ea.cols, eb.rows, ea.rows, StoredViews::Both, &ea.key, from_embedding(ea, eb))
        }
        (Some((ea, eb)), None) => {
            (ea.cols, eb.rows, ea.rows, StoredViews::EmbeddingOnly, &ea.key, from_embedding(ea, eb))
        }
        (None, Some((ha, hb))) => {
            (hb.rows, ha.cols, ha.rows, StoredViews::HeadOnly, &ha.key, (to_f32(&hb.values), to_f32(&ha.values)))
        }
        (None, None) => {
            let shown: Vec<&str> = names.iter().take(8).map(String::as_str).collect();
            return Err(file.err(format!(
                "no LoRA tensors for the embedding (`{}`) or the head (`{HEAD_A_KEY}`); the file holds {} \
                 tensor(s): {shown:?}{}",
                embedding_a_key(&module),
                names.len(),
                if names.len() > shown.len() { " ..." } else { "" }
            )));
        }
    };

    let (json_r, alpha) = json.rank_alpha_for(&config_path, &module)?;
    if json_r != rank {
        return Err(Error::ShapeMismatch(format!(
            "{}: r = {json_r} but `{rank_key}` in {} has rank {rank}",
            config_path.display(),
            weights_path.display()
        )));
    }

    let mut consumed = vec![HEAD_A_KEY.to_string(), HEAD_B_KEY.to_string()];
    if has_embedding {
        consumed.push(embedding_a_key(&module));
        consumed.push(embedding_b_key(&module));
    }
    let ignored_tensors = names.iter().filter(|n| !consumed.contains(n)).cloned().collect();

    let adapter = PeftAdapter {
        lora_vocab,
        lora_hidden,
        vocab,
        hidden,
        rank,
        alpha,
        use_rslora: json.use_rslora,
        embedding_module: module,
        target_modules: json.target_modules,
        base_model_name_or_path: json.base_model_name_or_path,
        views,
        ignored_tensors,
    };
    // Shapes and scale in their domains (V, d >= 1, finite scale, ...).
    adapter.config_builder().build()?;
    Ok(adapter)
}

/// The embedding module whose `lora_embedding_A` is in the file: a known path
/// if exactly one is present, else the only one present; `None` if there is none.
fn detect_module(file: &TensorFile, names: &[String]) -> Result<Option<String>> {
    let known: Vec<&str> = KNOWN_EMBEDDING_MODULES
        .iter()
        .copied()
        .filter(|m| file.contains(&embedding_a_key(m)) || file.contains(&embedding_b_key(m)))
        .collect();
    match known.as_slice() {
        [m] => return Ok(Some(m.to_string())),
        [] => {}
        _ => {
            return Err(file.err(format!(
                "LoRA embedding tensors for several modules {known:?}; name one with `PeftAdapter::read_with_module`"
            )))
        }
    }
    let found = embedding_modules_in(names);
    match found.as_slice() {
        [] => Ok(None),
        [m] => Ok(Some(m.to_string())),
        _ => Err(file.err(format!(
            "LoRA embedding tensors for several modules {found:?}; name one with `PeftAdapter::read_with_module`"
        ))),
    }
}

/// Every `<module>` with a `base_model.model.<module>.lora_embedding_A` or `_B` key, sorted.
fn embedding_modules_in(names: &[String]) -> Vec<&str> {
    let mut found: Vec<&str> = names
        .iter()
        .filter_map(|n| {
            n.strip_prefix(KEY_PREFIX).and_then(|rest| {
                rest.strip_suffix(".lora_embedding_A").or_else(|| rest.strip_suffix(".lora_embedding_B"))
            })
        })
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// For a head-only file: the first known embedding path in `target_modules`,
/// else `model.embed_tokens`.
fn guess_module(target_modules: &[String]) -> String {
    target_modules
        .iter()
        .find(|t| KNOWN_EMBEDDING_MODULES.contains(&t.as_str()))
        .cloned()
        .unwrap_or_else(|| KNOWN_EMBEDDING_MODULES[0].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_round_trip() {
        let x: Vec<u32> = (0..6).collect(); // [2, 3]
        let t = transpose(&x, 2, 3);
        assert_eq!(t, vec![0, 3, 1, 4, 2, 5]);
        assert_eq!(transpose(&t, 3, 2), x);
    }

    #[test]
    fn pattern_matching_like_peft() {
        let p = Path::new("x");
        let pats = vec![("embed_tokens".to_string(), json!(16)), ("q_proj".to_string(), json!(2))];
        let hit = find_pattern(p, "rank_pattern", &pats, "model.embed_tokens").unwrap();
        assert_eq!(hit.map(|h| h.0), Some("embed_tokens"));
        // Must start at a component boundary: `my_embed_tokens` does not match `embed_tokens`.
        let pats = vec![("embed_tokens".to_string(), json!(16))];
        assert!(find_pattern(p, "rank_pattern", &pats, "model.my_embed_tokens").unwrap().is_none());
        // `.` is a regex wildcard.
        let pats = vec![("model.embed.tokens".to_string(), json!(16))];
        assert!(find_pattern(p, "rank_pattern", &pats, "model.embed_tokens").unwrap().is_some());
        let pats = vec![("q_proj|k_proj".to_string(), json!(16))];
        assert!(matches!(find_pattern(p, "rank_pattern", &pats, "model.embed_tokens"), Err(Error::File { .. })));
    }

    #[test]
    fn target_modules_like_peft() {
        assert_eq!(default_target_modules("model.embed_tokens"), vec!["model.embed_tokens", "embed_tokens", "lm_head"]);
        assert_eq!(default_target_modules("transformer.wte"), vec!["transformer.wte", "wte", "lm_head"]);
        assert_eq!(default_target_modules("wte"), vec!["wte", "lm_head"]);
        assert_eq!(default_target_modules("lm_head"), vec!["lm_head"]);
        assert!(validate_module("a..b").is_err());
        assert!(validate_module("").is_err());
        assert!(validate_module("transformer.wte").is_ok());
    }
}
