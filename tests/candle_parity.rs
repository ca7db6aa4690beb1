//! `tiedlora::candle` on candle's CPU device against candle's own unfused
//! autograd in f64: every case of tests/common/candle_cases.rs.
#![cfg(feature = "candle")]

mod common;

use candle_core::Device;
use common::candle_cases as cases;

#[test]
fn lora_f32_batched_odd_vocab() {
    cases::lora_f32_batched_odd_vocab(&Device::Cpu);
}

#[test]
fn lora_f32_rank_one_one_token_softcap() {
    cases::lora_f32_rank_one_one_token_softcap(&Device::Cpu);
}

#[test]
fn lora_f32_rank_256() {
    cases::lora_f32_rank_256(&Device::Cpu);
}

#[test]
fn lora_f32_some_targets_ignored() {
    cases::lora_f32_some_targets_ignored(&Device::Cpu);
}

#[test]
fn lora_bf16() {
    cases::lora_bf16(&Device::Cpu);
}

#[test]
fn lora_f16() {
    cases::lora_f16(&Device::Cpu);
}

#[test]
fn all_targets_ignored_gives_zero_loss_and_embedding_only_gradients() {
    cases::all_targets_ignored_gives_zero_loss_and_embedding_only_gradients(&Device::Cpu);
}

#[test]
fn full_mode_w_gradient_sums_both_paths_through_logits() {
    cases::full_mode_w_gradient_sums_both_paths_through_logits(&Device::Cpu);
}

#[test]
fn full_mode_fused_loss_matches_unfused() {
    cases::full_mode_fused_loss_matches_unfused(&Device::Cpu);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    cases::bad_inputs_are_errors_not_panics(&Device::Cpu);
}

#[test]
fn non_contiguous_inputs_are_made_contiguous() {
    cases::non_contiguous_inputs_are_made_contiguous(&Device::Cpu);
}

#[test]
fn merged_weight_adds_the_delta_once_and_peft_round_trips() {
    cases::merged_weight_adds_the_delta_once_and_peft_round_trips(&Device::Cpu);
}

#[test]
fn tied_weight_loads_from_a_hugging_face_safetensors_file() {
    use candle_core::{DType, Tensor};
    use tiedlora::candle::TiedLora;
    let dev = Device::Cpu;
    let dir = std::env::temp_dir().join(format!("tiedlora-candle-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let w = Tensor::arange(0f32, 24.0, &dev).unwrap().reshape((6, 4)).unwrap().to_dtype(DType::BF16).unwrap();
    for name in ["transformer.wte.weight", "model.embed_tokens.weight"] {
        let file = dir.join("model.safetensors");
        let other = Tensor::zeros(3, DType::F32, &dev).unwrap();
        candle_core::safetensors::save(&[(name, w.clone()), ("lm_head.bias", other)].into_iter().collect(), &file)
            .unwrap();
        let (got, found) = TiedLora::load_tied_weight(&file, &dev).unwrap();
        assert_eq!(found, name);
        assert_eq!(got.dtype(), DType::BF16);
        assert_eq!(
            got.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
            w.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
        );
    }
    let file = dir.join("other.safetensors");
    candle_core::safetensors::save(&[("x", w)].into_iter().collect(), &file).unwrap();
    let e = TiedLora::load_tied_weight(&file, &dev).unwrap_err().to_string();
    assert!(e.contains("no `model.embed_tokens.weight` or `transformer.wte.weight`"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_peft_adapter_of_other_shapes_is_refused() {
    use candle_core::{DType, Tensor};
    use tiedlora::candle::TiedLora;
    use tiedlora::LoraConfig;
    let dev = Device::Cpu;
    let dir = std::env::temp_dir().join(format!("tiedlora-candle-peft-shape-{}", std::process::id()));
    let w = Tensor::zeros((8, 4), DType::F32, &dev).unwrap();
    let tied = TiedLora::lora(w.clone(), LoraConfig::builder(8, 4, 2).build().unwrap(), 3).unwrap();
    tied.save_peft(&dir, "model.embed_tokens").unwrap();
    let e = TiedLora::from_peft(w, LoraConfig::builder(8, 4, 3).build().unwrap(), &dir).unwrap_err().to_string();
    assert!(e.contains("r=2") && e.contains("r=3"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
