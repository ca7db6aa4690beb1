#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod backend;
pub mod config;
pub mod cpu;
pub mod dtype;
pub mod error;
pub mod init;
pub mod io;
pub mod peft;
pub mod validate;

pub use backend::{Backend, Grads, Weights};
pub use config::{LoraConfig, LoraConfigBuilder, Reduction};
pub use cpu::Cpu;
pub use dtype::{DType, Element, TokenId};
pub use error::{Error, Result};
pub use half::{bf16, f16};
