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
