//! PEFT adapter files: the golden adapter written by HF PEFT, round trips, the
//! exact key layout we write, module detection, and every error path.

use serde_json::Value;
use std::path::{Path, PathBuf};
use tiedlora::io::{write_f32, TensorFile};
use tiedlora::peft::{
    embedding_a_key, embedding_b_key, PeftAdapter, StoredViews, CONFIG_FILE, HEAD_A_KEY, HEAD_B_KEY, WEIGHTS_FILE,
};
use tiedlora::{Error, LoraConfig};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/goldens/peft_llama_tied");
const EMB_A: &str = "base_model.model.model.embed_tokens.lora_embedding_A";
const EMB_B: &str = "base_model.model.model.embed_tokens.lora_embedding_B";
const GOLDEN_CONFIG: &str =
    r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["model.embed_tokens", "embed_tokens"]}"#;

/// A fresh, empty temp dir unique to this process and test.
fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tiedlora-peft-{}-{}", std::process::id(), name));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rel_norm(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        d += (x as f64 - y as f64).powi(2);
        n += (y as f64).powi(2);
    }
    (d / n).sqrt()
}

fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; x.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = x[i * cols + j];
        }
    }
    t
}

/// The golden adapter's four tensors, rounded once from F64 to f32 (still tied).
fn golden_tensors() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let f = TensorFile::open(Path::new(GOLDEN).join(WEIGHTS_FILE)).unwrap();
    [EMB_A, EMB_B, HEAD_A_KEY, HEAD_B_KEY]
        .iter()
        .map(|k| {
            let (v, s) = f.f32(k).unwrap();
            (k.to_string(), s, v)
        })
        .collect()
}

/// Writes `config` and f32 `tensors` into a fresh dir.
fn adapter_dir(name: &str, config: &str, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> PathBuf {
    let dir = tmp(name);
    std::fs::write(dir.join(CONFIG_FILE), config).unwrap();
    let views: Vec<(&str, Vec<usize>, &[f32])> =
        tensors.iter().map(|(k, s, v)| (k.as_str(), s.clone(), v.as_slice())).collect();
    write_f32(dir.join(WEIGHTS_FILE), &views, None).unwrap();
    dir
}

fn small_adapter(module: &str, rslora: bool) -> PeftAdapter {
    let cfg = LoraConfig::builder(10, 6, 3).alpha(12.0).use_rslora(rslora).build().unwrap();
    let u: Vec<f32> = (0..30).map(|i| (i as f32 * 0.37).sin()).collect();
    let vh: Vec<f32> = (0..18).map(|i| (i as f32 * 0.91).cos()).collect();
    PeftAdapter::new(&cfg, u, vh, module).unwrap()
}

fn read_json(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap()).unwrap()
}

#[test]
fn reads_golden_peft_adapter() {
    let a = PeftAdapter::read(GOLDEN).unwrap();
    assert_eq!((a.vocab(), a.hidden(), a.rank()), (64, 16, 4));
    assert_eq!(a.alpha(), 8.0);
    assert!(!a.use_rslora());
    assert_eq!(a.scale(), 2.0);
    assert_eq!(a.embedding_module(), "model.embed_tokens");
    assert_eq!(a.target_modules(), ["model.embed_tokens", "embed_tokens"]);
    assert_eq!(a.stored_views(), StoredViews::Both);
    assert!(a.ignored_tensors().is_empty());
    assert_eq!(a.lora_vocab.len(), 64 * 4);
    assert_eq!(a.lora_hidden.len(), 4 * 16);

    // Exact layout: U[v, i] = f32(lora_embedding_A[i, v]), Vh[i, j] = f32(lora_embedding_B[j, i]).
    let f = TensorFile::open(Path::new(GOLDEN).join(WEIGHTS_FILE)).unwrap();
    let (ea, _) = f.f64(EMB_A).unwrap();
    let (eb, _) = f.f64(EMB_B).unwrap();
    for v in 0..64 {
        for i in 0..4 {
            assert_eq!(a.lora_vocab[v * 4 + i], ea[i * 64 + v] as f32, "lora_vocab[{v}, {i}]");
        }
    }
    for i in 0..4 {
        for j in 0..16 {
            assert_eq!(a.lora_hidden[i * 16 + j], eb[j * 4 + i] as f32, "lora_hidden[{i}, {j}]");
        }
    }

    // And they are the factors the e2e golden was computed with.
    let e2e = TensorFile::open(Path::new(GOLDEN).join("e2e.safetensors")).unwrap();
    let (u, us) = e2e.f32("lora_vocab").unwrap();
    let (vh, vs) = e2e.f32("lora_hidden").unwrap();
    assert_eq!(us, [64, 4]);
    assert_eq!(vs, [4, 16]);
    assert!(rel_norm(&a.lora_vocab, &u) <= 1e-6, "lora_vocab {}", rel_norm(&a.lora_vocab, &u));
    assert!(rel_norm(&a.lora_hidden, &vh) <= 1e-6, "lora_hidden {}", rel_norm(&a.lora_hidden, &vh));

    let cfg = a.config_builder().embed_scale(1.0).build().unwrap();
    assert_eq!((cfg.vocab(), cfg.hidden(), cfg.rank(), cfg.scale()), (64, 16, 4, 2.0));
}

#[test]
fn round_trip_golden_bitwise() {
    let a = PeftAdapter::read(GOLDEN).unwrap();
    let dir = tmp("roundtrip").join("nested/adapter"); // write creates missing parents
    a.write(&dir).unwrap();
    let b = PeftAdapter::read(&dir).unwrap();
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.lora_vocab), bits(&b.lora_vocab));
    assert_eq!(bits(&a.lora_hidden), bits(&b.lora_hidden));
    assert_eq!((a.vocab(), a.hidden(), a.rank()), (b.vocab(), b.hidden(), b.rank()));
    assert_eq!(a.alpha(), b.alpha());
    assert_eq!(a.use_rslora(), b.use_rslora());
    assert_eq!(a.embedding_module(), b.embedding_module());
    // PEFT wrote the golden's target_modules without the head; ours lists it (see `src/peft.rs`).
    assert_eq!(a.target_modules(), ["model.embed_tokens", "embed_tokens"]);
    assert_eq!(b.target_modules(), ["model.embed_tokens", "embed_tokens", "lm_head"]);
    assert_eq!(a.base_model_name_or_path(), b.base_model_name_or_path());
    assert_eq!(b.stored_views(), StoredViews::Both);
    // Apart from target_modules, nothing changed; and a second round trip is the identity.
    let cfg = a.config_builder().build().unwrap();
    let a2 = PeftAdapter::new(&cfg, a.lora_vocab.clone(), a.lora_hidden.clone(), a.embedding_module()).unwrap();
    assert_eq!(a2, b);
    let dir2 = tmp("roundtrip-2");
    b.write(&dir2).unwrap();
    assert_eq!(PeftAdapter::read(&dir2).unwrap(), b);

    // `TIEDLORA_PEFT_EXPORT=dir` keeps a copy for scripts/peft_check.py (PEFT itself loads it).
    if let Some(out) = std::env::var_os("TIEDLORA_PEFT_EXPORT") {
        a.write(&out).unwrap();
    }

    // Writing again over the same dir replaces the files.
    let mut c = b.clone();
    c.lora_vocab[0] = 0.5;
    c.write(&dir).unwrap();
    assert_eq!(PeftAdapter::read(&dir).unwrap().lora_vocab[0], 0.5);
}

#[test]
fn round_trip_golden_factors_gpt2_layout() {
    // The golden factors under GPT-2's embedding module `transformer.wte`.
    let g = PeftAdapter::read(GOLDEN).unwrap();
    let cfg = g.config_builder().build().unwrap();
    let a = PeftAdapter::new(&cfg, g.lora_vocab.clone(), g.lora_hidden.clone(), "transformer.wte").unwrap();
    let dir = tmp("roundtrip-gpt2");
    a.write(&dir).unwrap();
    assert_eq!(read_json(&dir)["target_modules"], serde_json::json!(["transformer.wte", "wte", "lm_head"]));
    let b = PeftAdapter::read(&dir).unwrap();
    assert_eq!(b.embedding_module(), "transformer.wte");
    assert_eq!(b.stored_views(), StoredViews::Both);
    assert_eq!(b.target_modules(), ["transformer.wte", "wte", "lm_head"]);
    assert_eq!(b, a);

    // `TIEDLORA_PEFT_EXPORT_GPT2=dir` keeps a copy for scripts/peft_check.py (GPT-2 layout).
    if let Some(out) = std::env::var_os("TIEDLORA_PEFT_EXPORT_GPT2") {
        a.write(&out).unwrap();
    }
}

#[test]
fn written_file_has_peft_layout_and_config() {
    let a = small_adapter("model.embed_tokens", false).with_base_model_name_or_path("tiny/llama");
    let dir = tmp("layout");
    a.write(&dir).unwrap();

    let f = TensorFile::open(dir.join(WEIGHTS_FILE)).unwrap();
    let mut want = vec![EMB_A, EMB_B, HEAD_A_KEY, HEAD_B_KEY];
    want.sort();
    assert_eq!(f.names(), want);
    let (v, d, r) = (10, 6, 3);
    for (key, shape) in [(EMB_A, [r, v]), (EMB_B, [d, r]), (HEAD_A_KEY, [r, d]), (HEAD_B_KEY, [v, r])] {
        assert_eq!(f.shape(key).unwrap(), shape, "{key}");
        assert_eq!(f.dtype_name(key).unwrap(), "F32", "{key}");
    }
    assert_eq!(f.f32(EMB_A).unwrap().0, transpose(&a.lora_vocab, v, r));
    assert_eq!(f.f32(EMB_B).unwrap().0, transpose(&a.lora_hidden, r, d));
    assert_eq!(f.f32(HEAD_A_KEY).unwrap().0, a.lora_hidden);
    assert_eq!(f.f32(HEAD_B_KEY).unwrap().0, a.lora_vocab);
    assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));

    let j = read_json(&dir);
    let expect = [
        ("peft_type", serde_json::json!("LORA")),
        ("r", serde_json::json!(3)),
        ("lora_alpha", serde_json::json!(12)),
        ("use_rslora", serde_json::json!(false)),
        ("target_modules", serde_json::json!(["model.embed_tokens", "embed_tokens", "lm_head"])),
        ("ensure_weight_tying", serde_json::json!(true)),
        ("lora_dropout", serde_json::json!(0.0)),
        ("bias", serde_json::json!("none")),
        ("init_lora_weights", serde_json::json!(true)),
        ("task_type", serde_json::json!("CAUSAL_LM")),
        ("fan_in_fan_out", serde_json::json!(false)),
        ("modules_to_save", Value::Null),
        ("base_model_name_or_path", serde_json::json!("tiny/llama")),
        ("inference_mode", serde_json::json!(true)),
        ("use_dora", serde_json::json!(false)),
    ];
    for (key, value) in expect {
        assert_eq!(j.get(key), Some(&value), "adapter_config.json `{key}`");
    }
    // A non-integral alpha is written as a float.
    let cfg = LoraConfig::builder(10, 6, 3).alpha(2.5).build().unwrap();
    let b = PeftAdapter::new(&cfg, a.lora_vocab.clone(), a.lora_hidden.clone(), "model.embed_tokens").unwrap();
    let dir2 = tmp("layout-alpha");
    b.write(&dir2).unwrap();
    assert_eq!(read_json(&dir2)["lora_alpha"], serde_json::json!(2.5));
    assert_eq!(PeftAdapter::read(&dir2).unwrap().alpha(), 2.5);
}

#[test]
fn gpt2_module_is_detected() {
    let a = small_adapter("transformer.wte", false);
    let dir = tmp("gpt2");
    a.write(&dir).unwrap();
    let f = TensorFile::open(dir.join(WEIGHTS_FILE)).unwrap();
    assert!(f.contains("base_model.model.transformer.wte.lora_embedding_A"));
    assert!(f.contains("base_model.model.transformer.wte.lora_embedding_B"));
    assert_eq!(read_json(&dir)["target_modules"], serde_json::json!(["transformer.wte", "wte", "lm_head"]));
    assert_eq!(a.target_modules(), ["transformer.wte", "wte", "lm_head"]);
    let b = PeftAdapter::read(&dir).unwrap();
    assert_eq!(b.embedding_module(), "transformer.wte");
    assert_eq!(b, a);
}

#[test]
fn custom_module_with_read_with_module() {
    let module = "model.language_model.embed_tokens";
    let a = small_adapter(module, false);
    let dir = tmp("custom");
    a.write(&dir).unwrap();
    let b = PeftAdapter::read_with_module(&dir, module).unwrap();
    assert_eq!(b.embedding_module(), module);
    assert_eq!(b.target_modules(), [module, "embed_tokens", "lm_head"]);
    assert_eq!(b, a);
    // The single unknown module is also found automatically.
    assert_eq!(PeftAdapter::read(&dir).unwrap(), a);

    // Naming a module the file does not hold is an error, not a silent head-only read.
    let e = PeftAdapter::read_with_module(&dir, "model.embed_tokens").unwrap_err();
    assert!(matches!(e, Error::File { .. }), "{e:?}");
    assert!(e.to_string().contains(module), "{e}");
    // So is a malformed module path.
    let e = PeftAdapter::read_with_module(&dir, "model..embed").unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { field: "embedding_module", .. }), "{e:?}");

    // Two unknown modules: auto-detection refuses to guess; naming one works.
    let mut t = golden_tensors();
    let (a_k, b_k) = (embedding_a_key("enc.embed"), embedding_b_key("enc.embed"));
    t.retain(|(k, _, _)| k == EMB_A || k == EMB_B);
    for (k, _, _) in t.iter_mut() {
        *k = k.replace("model.embed_tokens", "dec.embed");
    }
    let extra: Vec<_> = t.iter().map(|(k, s, v)| (k.replace("dec.embed", "enc.embed"), s.clone(), v.clone())).collect();
    t.extend(extra);
    let dir = adapter_dir("two-modules", GOLDEN_CONFIG, &t);
    let e = PeftAdapter::read(&dir).unwrap_err();
    assert!(matches!(e, Error::File { .. }), "{e:?}");
    assert!(e.to_string().contains("read_with_module"), "{e}");
    let c = PeftAdapter::read_with_module(&dir, "enc.embed").unwrap();
    assert_eq!(c.stored_views(), StoredViews::EmbeddingOnly);
    assert_eq!(c.ignored_tensors().len(), 2);
    assert!(!c.ignored_tensors().contains(&a_k) && !c.ignored_tensors().contains(&b_k));
    assert_eq!(c.lora_vocab, PeftAdapter::read(GOLDEN).unwrap().lora_vocab);
}

#[test]
fn head_only_file_takes_factors_from_head() {
    let mut t = golden_tensors();
    t.retain(|(k, _, _)| k == HEAD_A_KEY || k == HEAD_B_KEY);
    let dir = adapter_dir("head-only", GOLDEN_CONFIG, &t);
    let a = PeftAdapter::read(&dir).unwrap();
    let g = PeftAdapter::read(GOLDEN).unwrap();
    assert_eq!(a.stored_views(), StoredViews::HeadOnly);
    assert_eq!(a.embedding_module(), "model.embed_tokens");
    assert_eq!(a.lora_vocab, g.lora_vocab);
    assert_eq!(a.lora_hidden, g.lora_hidden);
    assert_eq!(a.scale(), 2.0);

    // The module of a head-only file comes from target_modules, with or without `lm_head`
    // listed (files written before the head was listed, and now).
    for targets in [r#"["transformer.wte", "wte"]"#, r#"["transformer.wte", "wte", "lm_head"]"#] {
        let config = format!(r#"{{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": {targets}}}"#);
        let a = PeftAdapter::read(adapter_dir("head-only-gpt2", &config, &t)).unwrap();
        assert_eq!(a.embedding_module(), "transformer.wte", "{targets}");
        assert_eq!(a.lora_vocab, g.lora_vocab);
    }
    // Only the head listed: the default module.
    let config = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["lm_head"]}"#;
    let a = PeftAdapter::read(adapter_dir("head-only-lm-head", config, &t)).unwrap();
    assert_eq!(a.embedding_module(), "model.embed_tokens");
}

#[test]
fn reads_both_target_module_forms() {
    // A GPT-2 adapter with the embedding and head keys reads the same whether its
    // config lists `lm_head` (as written now) or not (as written before).
    let a = small_adapter("transformer.wte", false);
    let dir = tmp("forms");
    a.write(&dir).unwrap();
    let mut j = read_json(&dir);
    j["target_modules"] = serde_json::json!(["transformer.wte", "wte"]);
    std::fs::write(dir.join(CONFIG_FILE), serde_json::to_string(&j).unwrap()).unwrap();
    let b = PeftAdapter::read(&dir).unwrap();
    assert_eq!(b.target_modules(), ["transformer.wte", "wte"]);
    assert_eq!((b.embedding_module(), b.stored_views()), ("transformer.wte", StoredViews::Both));
    assert_eq!((&b.lora_vocab, &b.lora_hidden, b.scale()), (&a.lora_vocab, &a.lora_hidden, a.scale()));
    // Written again, it lists the head.
    b.write(&dir).unwrap();
    assert_eq!(read_json(&dir)["target_modules"], serde_json::json!(["transformer.wte", "wte", "lm_head"]));
    assert_eq!(PeftAdapter::read(&dir).unwrap(), a);
    // A single string is accepted too.
    j["target_modules"] = serde_json::json!("transformer.wte");
    std::fs::write(dir.join(CONFIG_FILE), serde_json::to_string(&j).unwrap()).unwrap();
    assert_eq!(PeftAdapter::read(&dir).unwrap().target_modules(), ["transformer.wte"]);
}

#[test]
fn untied_head_is_not_tied_error() {
    let mut t = golden_tensors();
    let head_b = t.iter_mut().find(|(k, _, _)| k == HEAD_B_KEY).unwrap();
    head_b.2[7] += 1e-3;
    let dir = adapter_dir("not-tied", GOLDEN_CONFIG, &t);
    let e = PeftAdapter::read(&dir).unwrap_err();
    assert!(matches!(e, Error::NotTied(_)), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(HEAD_B_KEY) && msg.contains("max |difference|"), "{msg}");
    // 7 = [1, 3] in the [64, 4] head lora_B; the difference is ~1e-3.
    assert!(msg.contains("at [1, 3]") && msg.contains("e-3"), "{msg}");

    // The other factor too, and even a one-ulp difference counts.
    let mut t = golden_tensors();
    let head_a = t.iter_mut().find(|(k, _, _)| k == HEAD_A_KEY).unwrap();
    head_a.2[0] = f32::from_bits(head_a.2[0].to_bits() + 1);
    let dir = adapter_dir("not-tied-ulp", GOLDEN_CONFIG, &t);
    let e = PeftAdapter::read(&dir).unwrap_err();
    assert!(matches!(&e, Error::NotTied(m) if m.contains(HEAD_A_KEY)), "{e:?}");
}

#[test]
fn missing_directory_and_files() {
    let missing = std::env::temp_dir().join(format!("tiedlora-peft-{}-does-not-exist", std::process::id()));
    let e = PeftAdapter::read(&missing).unwrap_err();
    assert!(
        matches!(&e, Error::File { path, reason } if path.contains("does-not-exist") && reason.contains("does not exist")),
        "{e:?}"
    );

    let dir = tmp("no-config");
    let e = PeftAdapter::read(&dir).unwrap_err();
    assert!(matches!(&e, Error::File { path, .. } if path.ends_with(CONFIG_FILE)), "{e:?}");

    std::fs::write(dir.join(CONFIG_FILE), GOLDEN_CONFIG).unwrap();
    let e = PeftAdapter::read(&dir).unwrap_err();
    assert!(matches!(&e, Error::File { path, .. } if path.ends_with(WEIGHTS_FILE)), "{e:?}");

    std::fs::write(dir.join("adapter_model.bin"), b"pickle").unwrap();
    let e = PeftAdapter::read(&dir).unwrap_err();
    assert!(e.to_string().contains("safe_serialization"), "{e}");

    // A file where a directory is expected.
    let e = PeftAdapter::read(dir.join(CONFIG_FILE)).unwrap_err();
    assert!(matches!(&e, Error::File { reason, .. } if reason.contains("not a directory")), "{e:?}");

    // A corrupt safetensors file.
    std::fs::write(dir.join(WEIGHTS_FILE), b"\x08\0\0\0\0\0\0\0garbage!").unwrap();
    let e = PeftAdapter::read(&dir).unwrap_err();
    assert!(matches!(&e, Error::File { path, .. } if path.ends_with(WEIGHTS_FILE)), "{e:?}");

    // A safetensors file without any LoRA tensor for the embedding or head.
    let dir = adapter_dir("no-lora", GOLDEN_CONFIG, &[("other".into(), vec![2], vec![1.0, 2.0])]);
    let e = PeftAdapter::read(&dir).unwrap_err();
    assert!(
        matches!(&e, Error::File { reason, .. } if reason.contains("no LoRA tensors") && reason.contains("other")),
        "{e:?}"
    );

    // Half a pair.
    let mut t = golden_tensors();
    t.retain(|(k, _, _)| k != EMB_B);
    let dir = adapter_dir("half-pair", GOLDEN_CONFIG, &t);
    let e = PeftAdapter::read(&dir).unwrap_err();
    assert!(matches!(&e, Error::File { reason, .. } if reason.contains(EMB_B)), "{e:?}");
}

#[test]
fn malformed_json() {
    let t = golden_tensors();
    for (name, text, needle) in [
        ("json-syntax", "{ \"r\": 4, ", "invalid JSON"),
        ("json-array", "[1, 2]", "JSON object"),
        ("json-no-type", r#"{"r": 4, "lora_alpha": 8}"#, "peft_type"),
        ("json-ia3", r#"{"peft_type": "IA3", "r": 4}"#, "LORA"),
        ("json-r-str", r#"{"peft_type": "LORA", "r": "4"}"#, "`r`"),
        ("json-r-float", r#"{"peft_type": "LORA", "r": 4.5}"#, "`r`"),
        ("json-alpha", r#"{"peft_type": "LORA", "r": 4, "lora_alpha": "x"}"#, "lora_alpha"),
        ("json-rslora", r#"{"peft_type": "LORA", "r": 4, "use_rslora": "yes"}"#, "use_rslora"),
        ("json-dora", r#"{"peft_type": "LORA", "r": 4, "use_dora": true}"#, "DoRA"),
        ("json-regex", r#"{"peft_type": "LORA", "r": 4, "rank_pattern": {"^emb.*": 2}}"#, "regex"),
    ] {
        let dir = adapter_dir(name, text, &t);
        let e = PeftAdapter::read(&dir).unwrap_err();
        assert!(matches!(&e, Error::File { path, .. } if path.ends_with(CONFIG_FILE)), "{name}: {e:?}");
        assert!(e.to_string().contains(needle), "{name}: {e}");
    }
}

#[test]
fn wrong_r_and_bad_shapes() {
    let t = golden_tensors();
    let dir = adapter_dir("wrong-r", r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 8}"#, &t);
    let e = PeftAdapter::read(&dir).unwrap_err();
    assert!(matches!(&e, Error::ShapeMismatch(m) if m.contains("r = 8") && m.contains("rank 4")), "{e:?}");

    // No `r` at all means PEFT's default 8, which also disagrees with rank 4.
    let dir = adapter_dir("default-r", r#"{"peft_type": "LORA"}"#, &t);
    assert!(matches!(PeftAdapter::read(&dir), Err(Error::ShapeMismatch(_))));

    // A rank_pattern entry for the module overrides `r` (and alpha_pattern alpha), as in PEFT.
    let cfg = r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 8,
        "rank_pattern": {"q_proj": 2, "embed_tokens": 4}, "alpha_pattern": {"model.embed_tokens": 16}}"#;
    let a = PeftAdapter::read(adapter_dir("rank-pattern", cfg, &t)).unwrap();
    assert_eq!((a.rank(), a.alpha(), a.scale()), (4, 16.0, 4.0));

    // Embedding A and B with different ranks.
    let mut t2 = t.clone();
    let b = t2.iter_mut().find(|(k, _, _)| k == EMB_B).unwrap();
    b.1 = vec![32, 2];
    let dir = adapter_dir("rank-differs", GOLDEN_CONFIG, &t2);
    let e = PeftAdapter::read(&dir).unwrap_err();
    assert!(matches!(&e, Error::ShapeMismatch(m) if m.contains(EMB_B)), "{e:?}");

    // A 3-D tensor.
    let mut t3 = t.clone();
    t3.iter_mut().find(|(k, _, _)| k == HEAD_A_KEY).unwrap().1 = vec![4, 4, 4];
    let e = PeftAdapter::read(adapter_dir("three-d", GOLDEN_CONFIG, &t3)).unwrap_err();
    assert!(matches!(&e, Error::ShapeMismatch(m) if m.contains(HEAD_A_KEY) && m.contains("2 dimensions")), "{e:?}");

    // Head factors whose shapes are not the embedding's transposed (a vocab of 32 in the head).
    let mut t4 = t.clone();
    let hb = t4.iter_mut().find(|(k, _, _)| k == HEAD_B_KEY).unwrap();
    hb.1 = vec![32, 4];
    hb.2.truncate(128);
    let e = PeftAdapter::read(adapter_dir("head-shape", GOLDEN_CONFIG, &t4)).unwrap_err();
    assert!(matches!(&e, Error::ShapeMismatch(m) if m.contains("transposes")), "{e:?}");
}

#[test]
fn unsupported_dtype_and_non_finite_values() {
    let dir = tmp("i64");
    std::fs::write(dir.join(CONFIG_FILE), GOLDEN_CONFIG).unwrap();
    let ints: Vec<u8> = (0..4 * 64).flat_map(|i: i64| i.to_le_bytes()).collect();
    let floats: Vec<u8> = (0..16 * 4).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let views = vec![
        (EMB_A.to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![4, 64], &ints).unwrap()),
        (
            EMB_B.to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![16, 4], &floats).unwrap(),
        ),
    ];
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(dir.join(WEIGHTS_FILE), bytes).unwrap();
    let e = PeftAdapter::read(&dir).unwrap_err();
    assert!(matches!(&e, Error::UnsupportedDtype { actual, .. } if actual == "I64"), "{e:?}");
    assert!(e.to_string().contains(EMB_A), "{e}");

    let mut t = golden_tensors();
    t.iter_mut().find(|(k, _, _)| k == EMB_A).unwrap().2[5] = f32::NAN;
    let e = PeftAdapter::read(adapter_dir("nan", GOLDEN_CONFIG, &t)).unwrap_err();
    assert!(
        matches!(&e, Error::File { reason, .. } if reason.contains(EMB_A) && reason.contains("not finite")),
        "{e:?}"
    );
}

#[test]
fn new_validates_buffers() {
    let cfg = LoraConfig::builder(10, 6, 3).build().unwrap();
    let e = PeftAdapter::new(&cfg, vec![0.0; 29], vec![0.0; 18], "model.embed_tokens").unwrap_err();
    assert!(matches!(e, Error::BufferLength { arg: "lora_vocab", expected: 30, actual: 29, .. }), "{e:?}");
    assert!(e.to_string().contains("lora_vocab"), "{e}");
    let e = PeftAdapter::new(&cfg, vec![0.0; 30], vec![0.0; 19], "model.embed_tokens").unwrap_err();
    assert!(matches!(e, Error::BufferLength { arg: "lora_hidden", expected: 18, actual: 19, .. }), "{e:?}");
    let e = PeftAdapter::new(&cfg, vec![0.0; 30], vec![f32::INFINITY; 18], "model.embed_tokens").unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { field: "lora_hidden", .. }), "{e:?}");
    let e = PeftAdapter::new(&cfg, vec![0.0; 30], vec![0.0; 18], "").unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { field: "embedding_module", .. }), "{e:?}");

    // The factor buffers are public: write re-checks them.
    let mut a = small_adapter("model.embed_tokens", false);
    a.lora_vocab.pop();
    let dir = tmp("write-bad-len");
    let e = a.write(&dir).unwrap_err();
    assert!(matches!(e, Error::BufferLength { arg: "lora_vocab", .. }), "{e:?}");
    assert!(!dir.join(WEIGHTS_FILE).exists());
}

#[test]
fn rslora_is_honoured() {
    // From a PEFT-style json.
    let cfg = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": true}"#;
    let a = PeftAdapter::read(adapter_dir("rslora-json", cfg, &golden_tensors())).unwrap();
    assert!(a.use_rslora());
    assert_eq!(a.scale(), 4.0); // 8 / sqrt(4)
    assert_eq!(a.config_builder().build().unwrap().scale(), 4.0);

    // Through new -> write -> read.
    let a = small_adapter("model.embed_tokens", true);
    let dir = tmp("rslora-write");
    a.write(&dir).unwrap();
    assert_eq!(read_json(&dir)["use_rslora"], Value::Bool(true));
    let b = PeftAdapter::read(&dir).unwrap();
    assert!(b.use_rslora());
    assert_eq!(b.scale(), 12.0 / 3f64.sqrt());
    assert_ne!(b.scale(), 12.0 / 3.0);
}
