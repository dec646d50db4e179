//! Tensor JSON (Open Inference Protocol v2) as a predict body carries it: decoded or refused,
//! never a panic; a decoded tensor writes back to JSON that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelhub_core::Tensor;
use modelhub_core::tensor::JsonTensor;

fuzz_target!(|data: &[u8]| {
    let Ok(json) = serde_json::from_slice::<JsonTensor>(data) else {
        return;
    };
    if let Ok(tensor) = Tensor::from_json(&json) {
        let again: JsonTensor = serde_json::from_value(tensor.to_json()).expect("own JSON");
        assert_eq!(Tensor::from_json(&again).expect("own JSON decodes"), tensor);
    }
});
