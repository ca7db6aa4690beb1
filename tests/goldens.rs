//! Golden parity: every op and every expected tensor of every golden case
//! (tests/data/goldens and `$TIEDLORA_GOLDENS`) against the CPU reference.
//! Prints one line per case, op and tensor with its relative error.

mod common;

use common::golden::{all_cases, discover, Check};
use common::harness::run_case;
use tiedlora::CpuReference;

fn report(checks: &[Check]) -> usize {
    for c in checks {
        println!("{c}");
    }
    checks.iter().filter(|c| !c.passed()).count()
}

#[test]
fn goldens_cpu_reference() {
    let cases = all_cases().expect("golden discovery");
    assert!(cases.len() >= 4, "expected the four built-in cases, found {}", cases.len());
    let backend = CpuReference::new();
    let mut failures = Vec::new();
    let mut lines = 0;
    for (label, case) in &cases {
        match run_case(&backend, case, label) {
            Ok(checks) => {
                lines += checks.len();
                if report(&checks) > 0 {
                    failures.push(format!("{label}/{}: tolerance exceeded", case.name()));
                }
            }
            // A malformed or unreadable golden is a failure, never a skip.
            Err(e) => {
                println!("{label}/{}: ERROR {e}", case.name());
                failures.push(format!("{label}/{}: {e}", case.name()));
            }
        }
    }
    println!("{} cases, {lines} comparisons", cases.len());
    assert!(failures.is_empty(), "golden failures:\n{}", failures.join("\n"));
}

#[test]
fn builtin_goldens_cover_every_op_and_dtype() {
    let cases = discover(&common::golden::builtin_dir()).unwrap();
    let names: Vec<String> = cases.iter().map(|c| c.name()).collect();
    for want in ["small_f32", "f16_dups_sum", "bf16_rslora_softcap", "peft_llama_tied"] {
        assert!(names.contains(&want.to_string()), "missing golden {want}: {names:?}");
    }
    let checks = run_case(&CpuReference::new(), &cases[0], "builtin").unwrap();
    assert!(checks.len() >= 10, "too few comparisons: {}", checks.len());
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tiedlora-goldens-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn extra_golden_directory_is_discovered_and_run() {
    let dir = temp_dir("extra");
    let src = common::golden::builtin_dir();
    std::fs::copy(src.join("small_f32.safetensors"), dir.join("copy_of_small.safetensors")).unwrap();
    let peft = dir.join("peft_copy");
    std::fs::create_dir_all(&peft).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors", "e2e.safetensors"] {
        std::fs::copy(src.join("peft_llama_tied").join(f), peft.join(f)).unwrap();
    }
    let cases = discover(&dir).unwrap();
    assert_eq!(cases.len(), 2);
    for case in &cases {
        let checks = run_case(&CpuReference::new(), case, "extra").unwrap();
        assert!(checks.iter().all(Check::passed), "{checks:#?}");
    }
}

#[test]
fn malformed_golden_is_an_error_not_a_skip() {
    let dir = temp_dir("malformed");
    std::fs::write(dir.join("garbage.safetensors"), b"this is not a safetensors file").unwrap();
    let cases = discover(&dir).unwrap();
    assert_eq!(cases.len(), 1);
    let err = run_case(&CpuReference::new(), &cases[0], "malformed").unwrap_err();
    assert!(matches!(err, tiedlora::Error::File { .. }), "{err}");

    // A valid safetensors file that is not a golden (no format metadata).
    let dir = temp_dir("not-golden");
    tiedlora::io::write_f32(dir.join("plain.safetensors"), &[("w", vec![2, 2], &[1.0, 2.0, 3.0, 4.0])], None).unwrap();
    let cases = discover(&dir).unwrap();
    let err = run_case(&CpuReference::new(), &cases[0], "plain").unwrap_err();
    assert!(err.to_string().contains("format"), "{err}");

    // A missing directory is an error too.
    assert!(discover(&dir.join("does-not-exist")).is_err());
}

#[test]
fn golden_with_a_wrong_expected_value_fails() {
    // The harness must be able to fail: perturb one expected tensor and rerun.
    let dir = temp_dir("perturbed");
    let src = tiedlora::io::TensorFile::open(common::golden::builtin_dir().join("small_f32.safetensors")).unwrap();
    let mut owned: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut ints: Vec<(String, Vec<usize>, Vec<i64>)> = Vec::new();
    for name in src.names() {
        if src.dtype_name(&name).unwrap() == "I64" {
            let (v, s) = src.i64(&name).unwrap();
            ints.push((name, s, v));
        } else {
            let (mut v, s) = src.f32(&name).unwrap();
            if name == "xent_grad_lora_vocab" {
                v[0] += 1.0;
            }
            owned.push((name, s, v));
        }
    }
    let views: Vec<(&str, Vec<usize>, &[f32])> =
        owned.iter().map(|(n, s, v)| (n.as_str(), s.clone(), v.as_slice())).collect();
    let path = dir.join("perturbed.safetensors");
    tiedlora::io::write_f32(&path, &views, Some(src.metadata().clone())).unwrap();
    // Re-add the integer tensors by rewriting with safetensors directly.
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut all: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    let int_bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
        ints.iter().map(|(n, s, v)| (n.clone(), s.clone(), bytemuck::cast_slice(v).to_vec())).collect();
    for (n, s, b) in &int_bytes {
        all.push((n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::I64, s.clone(), b).unwrap()));
    }
    let out = safetensors::serialize(all, Some(src.metadata().clone())).unwrap();
    std::fs::write(&path, out).unwrap();
    let checks = run_case(&CpuReference::new(), &common::golden::CasePath::Standard(path), "perturbed").unwrap();
    let bad: Vec<&Check> = checks.iter().filter(|c| !c.passed()).collect();
    assert_eq!(bad.len(), 1, "{checks:#?}");
    assert_eq!(bad[0].tensor, "xent_grad_lora_vocab");
}
