//! Shared foundations of the Model Hub services: the error vocabulary, tensors, identifiers,
//! envelope encryption and request signing.

pub mod crypto;
pub mod error;
pub mod fs;
pub mod id;
pub mod kek;
pub mod pool;
pub mod secret;
pub mod serve;
pub mod signing;
pub mod telemetry;
pub mod tensor;

pub use error::{ApiError, ErrorCode};
pub use tensor::{DataType, InputRange, Tensor, TensorSpec};
