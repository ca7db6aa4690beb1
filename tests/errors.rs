//! Every bad input is a typed `Err` naming the argument and the expected vs
//! actual value, returned before any output is touched; NaN data propagates
//! without panicking.

mod common;

use common::rand_inputs::{fresh_rng, ids as random_ids, normal};
use tiedlora::io::TensorFile;
use tiedlora::{bf16, Backend, CpuReference, Error, Grads, LoraConfig, Weights};

const V: usize = 11;
const D: usize = 6;
const R: usize = 3;
const T: usize = 5;

struct Setup {
    cfg: LoraConfig,
    w: Vec<f32>,
    u: Vec<f32>,
    vh: Vec<f32>,
    h: Vec<f32>,
    ids: Vec<i64>,
}

fn setup() -> Setup {
    let mut rng = fresh_rng("errors");
    Setup {
        cfg: LoraConfig::builder(V, D, R).alpha(4.0).build().unwrap(),
        w: normal(&mut rng, V * D, 1.0),
        u: normal(&mut rng, V * R, 1.0),
        vh: normal(&mut rng, R * D, 1.0),
        h: normal(&mut rng, T * D, 1.0),
        ids: random_ids(&mut rng, T, V),
    }
}

fn wt(s: &Setup) -> Weights<'_, CpuReference, f32> {
    Weights { w: &s.w, lora_vocab: &s.u, lora_hidden: &s.vh }
}

fn expect_len(err: Error, arg: &str, expected: usize, actual: usize) {
    match &err {
        Error::BufferLength { arg: a, expected: e, actual: got, .. } => {
            assert_eq!((*a, *e, *got), (arg, expected, actual), "{err}");
            let msg = err.to_string();
            assert!(
                msg.contains(arg) && msg.contains(&expected.to_string()) && msg.contains(&actual.to_string()),
                "{msg}"
            );
        }
        other => panic!("expected BufferLength for {arg}, got {other:?}"),
    }
}

#[test]
fn wrong_weight_lengths() {
    let s = setup();
    let cpu = CpuReference::new();
    let mut out = vec![f32::NAN; T * D];
    let short_w = &s.w[..V * D - 1];
    let bad = Weights::host(short_w, &s.u, &s.vh);
    expect_len(cpu.embed_forward(&s.cfg, &bad, &s.ids, &mut out).unwrap_err(), "w", V * D, V * D - 1);
    let bad = Weights::host(&s.w, &s.u[..V * R - 2], &s.vh);
    expect_len(cpu.embed_forward(&s.cfg, &bad, &s.ids, &mut out).unwrap_err(), "lora_vocab", V * R, V * R - 2);
    let long_vh: Vec<f32> = s.vh.iter().chain([1.0f32].iter()).copied().collect();
    let bad = Weights::host(&s.w, &s.u, &long_vh);
    expect_len(cpu.embed_forward(&s.cfg, &bad, &s.ids, &mut out).unwrap_err(), "lora_hidden", R * D, R * D + 1);
    assert!(out.iter().all(|x| x.is_nan()), "output touched on error");
}

#[test]
fn wrong_output_and_gradient_lengths() {
    let s = setup();
    let cpu = CpuReference::new();
    let mut out = vec![f32::NAN; T * D + 1];
    expect_len(cpu.embed_forward(&s.cfg, &wt(&s), &s.ids, &mut out).unwrap_err(), "out", T * D, T * D + 1);
    let mut logits = vec![f32::NAN; T * V - 1];
    expect_len(cpu.head_forward(&s.cfg, &wt(&s), &s.h, &mut logits).unwrap_err(), "logits", T * V, T * V - 1);

    let mut du = vec![0f32; V * R];
    let mut dvh = vec![0f32; R * D - 1];
    let d_embed = vec![1f32; T * D];
    let mut g = Grads::<CpuReference> { lora_vocab: &mut du, lora_hidden: &mut dvh, w: None };
    expect_len(
        cpu.embed_backward(&s.cfg, &wt(&s), &s.ids, &d_embed, &mut g).unwrap_err(),
        "grad_lora_hidden",
        R * D,
        R * D - 1,
    );
    let mut dvh = vec![0f32; R * D];
    let mut dw = vec![0f32; V * D + 3];
    let mut g = Grads::<CpuReference> { lora_vocab: &mut du, lora_hidden: &mut dvh, w: Some(&mut dw) };
    expect_len(cpu.embed_backward(&s.cfg, &wt(&s), &s.ids, &d_embed, &mut g).unwrap_err(), "grad_w", V * D, V * D + 3);
    // d_embed must match ids: T x d.
    let mut g = Grads::<CpuReference> { lora_vocab: &mut du, lora_hidden: &mut dvh, w: None };
    expect_len(cpu.embed_backward(&s.cfg, &wt(&s), &s.ids, &d_embed[..D], &mut g).unwrap_err(), "d_embed", T * D, D);
    assert!(du.iter().chain(&dvh).all(|&x| x == 0.0), "gradients touched on error");
}

#[test]
fn head_and_xent_shape_mismatches() {
    let s = setup();
    let cpu = CpuReference::new();
    // h not a whole number of rows.
    let mut logits = vec![f32::NAN; T * V];
    let err = cpu.head_forward(&s.cfg, &wt(&s), &s.h[..T * D - 1], &mut logits).unwrap_err();
    assert!(matches!(err, Error::BufferLength { arg: "h", .. }), "{err}");
    // d_logits of the wrong size.
    let (mut du, mut dvh) = (vec![0f32; V * R], vec![0f32; R * D]);
    let mut dh = vec![f32::NAN; T * D];
    let mut g = Grads::<CpuReference> { lora_vocab: &mut du, lora_hidden: &mut dvh, w: None };
    let d_logits = vec![0.5f32; T * V - V];
    let err = cpu.head_backward(&s.cfg, &wt(&s), &s.h, &d_logits, &mut dh, &mut g).unwrap_err();
    expect_len(err, "d_logits", T * V, (T - 1) * V);
    // targets vs h: T disagrees.
    let targets: Vec<i64> = vec![1; T + 1];
    let (mut loss, mut lse) = ([f32::NAN], vec![f32::NAN; T + 1]);
    let err = cpu.head_xent_forward(&s.cfg, &wt(&s), &s.h, &targets, &mut loss, &mut lse).unwrap_err();
    expect_len(err, "h", (T + 1) * D, T * D);
    let targets: Vec<i64> = vec![1; T];
    let mut lse = vec![f32::NAN; T - 1];
    let err = cpu.head_xent_forward(&s.cfg, &wt(&s), &s.h, &targets, &mut loss, &mut lse).unwrap_err();
    expect_len(err, "lse", T, T - 1);
    let mut lse = vec![f32::NAN; T];
    let mut loss2 = [f32::NAN; 2];
    let err = cpu.head_xent_forward(&s.cfg, &wt(&s), &s.h, &targets, &mut loss2, &mut lse).unwrap_err();
    expect_len(err, "loss", 1, 2);
    // Empty token list.
    let err = cpu.head_xent_forward(&s.cfg, &wt(&s), &[], &[] as &[i64], &mut loss, &mut []).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch(ref m) if m.contains("targets")), "{err}");
    // A config for another model.
    let other = LoraConfig::builder(V + 1, D, R).build().unwrap();
    let mut out = vec![f32::NAN; T * D];
    expect_len(cpu.embed_forward(&other, &wt(&s), &s.ids, &mut out).unwrap_err(), "w", (V + 1) * D, V * D);
    // merge with a mismatched W.
    let mut w = s.w.clone();
    w.pop();
    expect_len(cpu.merge(&s.cfg, &mut w, &s.u, &s.vh).unwrap_err(), "w", V * D, V * D - 1);
}

#[test]
fn ids_out_of_range() {
    let s = setup();
    let cpu = CpuReference::new();
    let mut out = vec![f32::NAN; T * D];
    for bad in [V as i64, -1, i64::MAX, i64::MIN, -100] {
        let mut ids = s.ids.clone();
        ids[3] = bad;
        let err = cpu.embed_forward(&s.cfg, &wt(&s), &ids, &mut out).unwrap_err();
        assert_eq!(err, Error::TokenOutOfRange { arg: "ids", index: 3, value: bad, vocab: V });
        assert!(err.to_string().contains(&bad.to_string()) && err.to_string().contains("ids[3]"), "{err}");
    }
    let ids_u32: Vec<u32> = vec![0, 1, V as u32, 2, 3];
    let err = cpu.embed_forward(&s.cfg, &wt(&s), &ids_u32, &mut out).unwrap_err();
    assert!(matches!(err, Error::TokenOutOfRange { index: 2, .. }), "{err}");
    let (mut du, mut dvh) = (vec![0f32; V * R], vec![0f32; R * D]);
    let mut g = Grads::<CpuReference> { lora_vocab: &mut du, lora_hidden: &mut dvh, w: None };
    let err = cpu.embed_backward(&s.cfg, &wt(&s), &ids_u32, &[1f32; T * D], &mut g).unwrap_err();
    assert!(matches!(err, Error::TokenOutOfRange { arg: "ids", .. }), "{err}");
    assert!(out.iter().all(|x| x.is_nan()));
}

#[test]
fn targets_out_of_range_but_ignore_index_is_fine() {
    let s = setup();
    let cpu = CpuReference::new();
    let (mut loss, mut lse) = ([f32::NAN], vec![f32::NAN; T]);
    let mut targets: Vec<i64> = vec![0, 1, 2, 3, -100];
    cpu.head_xent_forward(&s.cfg, &wt(&s), &s.h, &targets, &mut loss, &mut lse).unwrap();
    assert!(loss[0].is_finite());
    for bad in [V as i64, -1, -101] {
        targets[1] = bad;
        let err = cpu.head_xent_forward(&s.cfg, &wt(&s), &s.h, &targets, &mut loss, &mut lse).unwrap_err();
        assert!(matches!(err, Error::TokenOutOfRange { arg: "targets", index: 1, .. }), "{err}");
        let (mut du, mut dvh, mut dh) = (vec![0f32; V * R], vec![0f32; R * D], vec![f32::NAN; T * D]);
        let mut g = Grads::<CpuReference> { lora_vocab: &mut du, lora_hidden: &mut dvh, w: None };
        let err = cpu.head_xent_backward(&s.cfg, &wt(&s), &s.h, &targets, &lse, 1.0, &mut dh, &mut g).unwrap_err();
        assert!(matches!(err, Error::TokenOutOfRange { arg: "targets", .. }), "{err}");
        assert!(dh.iter().all(|x| x.is_nan()) && du.iter().all(|&x| x == 0.0));
    }
    // u32 targets: -100 as u32 is the ignore index; any other large value is out of range.
    let t32: Vec<u32> = vec![0, 1, (-100i32) as u32, 3, 4];
    cpu.head_xent_forward(&s.cfg, &wt(&s), &s.h, &t32, &mut loss, &mut lse).unwrap();
    let t32: Vec<u32> = vec![0, 1, u32::MAX, 3, 4];
    let err = cpu.head_xent_forward(&s.cfg, &wt(&s), &s.h, &t32, &mut loss, &mut lse).unwrap_err();
    assert!(matches!(err, Error::TokenOutOfRange { value: 4294967295, .. }), "{err}");
}

#[test]
fn invalid_configs() {
    let field = |r: tiedlora::Result<LoraConfig>| match r {
        Err(Error::InvalidConfig { field, .. }) => field,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    assert_eq!(field(LoraConfig::builder(10, 4, 0).build()), "rank");
    assert_eq!(field(LoraConfig::builder(0, 4, 2).build()), "vocab");
    assert_eq!(field(LoraConfig::builder(10, 0, 2).build()), "hidden");
    assert_eq!(field(LoraConfig::builder(10, 4, 2).alpha(f64::NAN).build()), "alpha");
    assert_eq!(field(LoraConfig::builder(10, 4, 2).alpha(f64::INFINITY).build()), "alpha");
    assert_eq!(field(LoraConfig::builder(10, 4, 2).embed_scale(f64::NAN).build()), "embed_scale");
    assert_eq!(field(LoraConfig::builder(10, 4, 2).logit_softcap(0.0).build()), "logit_softcap");
    assert_eq!(field(LoraConfig::builder(10, 4, 2).logit_softcap(-3.0).build()), "logit_softcap");
    assert_eq!(field(LoraConfig::builder(10, 4, 2).logit_softcap(f64::INFINITY).build()), "logit_softcap");
    assert_eq!(field(LoraConfig::builder(1 << 31, 4, 2).build()), "vocab");
    assert_eq!(field(LoraConfig::builder(10, 4, 2).alpha(1e300).build()), "alpha");
    let msg = LoraConfig::builder(10, 4, 0).build().unwrap_err().to_string();
    assert!(msg.contains("rank") && msg.contains('0'), "{msg}");
}

#[test]
fn unknown_dtype_in_a_file() {
    let dir = std::env::temp_dir().join(format!("tiedlora-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ints.safetensors");
    let data: Vec<u8> = bytemuck::cast_slice(&[1i64, 2, 3]).to_vec();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![3], &data).unwrap();
    let data8: Vec<u8> = vec![1, 2, 3];
    let view8 = safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![3], &data8).unwrap();
    std::fs::write(&path, safetensors::serialize([("ids", view), ("bytes", view8)], None).unwrap()).unwrap();
    let f = TensorFile::open(&path).unwrap();
    let err = f.f32("ids").unwrap_err();
    assert!(matches!(err, Error::UnsupportedDtype { ref actual, .. } if actual == "I64"), "{err}");
    assert!(err.to_string().contains("ids") && err.to_string().contains("F32"), "{err}");
    assert!(matches!(f.i64("bytes").unwrap_err(), Error::UnsupportedDtype { .. }));
    let err = f.exact::<bf16>("ids").unwrap_err();
    assert!(matches!(err, Error::UnsupportedDtype { expected: "bf16", .. }), "{err}");
    assert!(matches!(f.f32("missing").unwrap_err(), Error::File { .. }));
    assert!(matches!(TensorFile::open(dir.join("nope.safetensors")).unwrap_err(), Error::File { .. }));
}

#[test]
fn nan_inputs_propagate_without_panicking() {
    let mut s = setup();
    let cpu = CpuReference::new();
    let row = s.ids[0] as usize;
    s.w[row * D] = f32::NAN;
    let mut out = vec![0f32; T * D];
    cpu.embed_forward(&s.cfg, &wt(&s), &s.ids, &mut out).unwrap();
    assert!(out[0].is_nan());
    s.h[1] = f32::NAN;
    let targets: Vec<i64> = vec![0; T];
    let (mut loss, mut lse) = ([0f32], vec![0f32; T]);
    cpu.head_xent_forward(&s.cfg, &wt(&s), &s.h, &targets, &mut loss, &mut lse).unwrap();
    assert!(loss[0].is_nan() && lse[0].is_nan());
    let (mut du, mut dvh, mut dh) = (vec![0f32; V * R], vec![0f32; R * D], vec![0f32; T * D]);
    let mut g = Grads::<CpuReference> { lora_vocab: &mut du, lora_hidden: &mut dvh, w: None };
    cpu.head_xent_backward(&s.cfg, &wt(&s), &s.h, &targets, &lse, 1.0, &mut dh, &mut g).unwrap();
    assert!(dh[..D].iter().all(|x| x.is_nan()));
    // NaN alpha is rejected at build time, but a NaN upstream gradient just propagates.
    cpu.head_xent_backward(&s.cfg, &wt(&s), &s.h, &targets, &lse, f32::NAN, &mut dh, &mut g).unwrap();
}
