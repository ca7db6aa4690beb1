//! Shared test support: golden-file loading, comparison, random inputs.
#![allow(dead_code)]

pub mod golden;
pub mod harness;
pub mod rand_inputs;
