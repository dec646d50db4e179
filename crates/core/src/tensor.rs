//! Tensors as the public API carries them (Open Inference Protocol v2 JSON) and as the
//! services carry them (raw little-endian bytes in `modelhub.common.v1.Tensor`).

use std::fmt;

use half::f16;
use modelhub_proto::common::v1 as pb;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::ApiError;

/// Element types of the API (`docs/API.md`, "Tensors").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    Uint8,
    Int8,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
}

impl DataType {
    pub const ALL: [DataType; 8] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Int8,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Fp32,
        DataType::Fp64,
    ];

    /// The OIP v2 name: `BOOL`, `FP32`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Int8 => "INT8",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
        }
    }

    pub fn parse(s: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// Bytes per element in the raw encoding.
    pub fn size(self) -> usize {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Fp16 => 2,
            DataType::Int32 | DataType::Fp32 => 4,
            DataType::Int64 | DataType::Fp64 => 8,
        }
    }

    pub fn to_proto(self) -> pb::DataType {
        match self {
            DataType::Bool => pb::DataType::Bool,
            DataType::Uint8 => pb::DataType::Uint8,
            DataType::Int8 => pb::DataType::Int8,
            DataType::Int32 => pb::DataType::Int32,
            DataType::Int64 => pb::DataType::Int64,
            DataType::Fp16 => pb::DataType::Fp16,
            DataType::Fp32 => pb::DataType::Fp32,
            DataType::Fp64 => pb::DataType::Fp64,
        }
    }

    pub fn from_proto(value: i32) -> Result<DataType, ApiError> {
        Ok(match pb::DataType::try_from(value) {
            Ok(pb::DataType::Bool) => DataType::Bool,
            Ok(pb::DataType::Uint8) => DataType::Uint8,
            Ok(pb::DataType::Int8) => DataType::Int8,
            Ok(pb::DataType::Int32) => DataType::Int32,
            Ok(pb::DataType::Int64) => DataType::Int64,
            Ok(pb::DataType::Fp16) => DataType::Fp16,
            Ok(pb::DataType::Fp32) => DataType::Fp32,
            Ok(pb::DataType::Fp64) => DataType::Fp64,
            Ok(pb::DataType::Unspecified) | Err(_) => {
                return Err(ApiError::bad_request(format!("unknown datatype {value}")));
            }
        })
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for DataType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for DataType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DataType::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown datatype {s:?} (expected one of BOOL, UINT8, INT8, INT32, INT64, FP16, FP32, FP64)"
            ))
        })
    }
}

/// The declared signature of a model input or output; `-1` marks a dynamic dimension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
}

impl TensorSpec {
    pub fn to_proto(&self) -> pb::TensorSpec {
        pb::TensorSpec {
            name: self.name.clone(),
            datatype: self.datatype.to_proto() as i32,
            shape: self.shape.clone(),
        }
    }
}

impl TryFrom<pb::TensorSpec> for TensorSpec {
    type Error = ApiError;

    fn try_from(p: pb::TensorSpec) -> Result<Self, ApiError> {
        Ok(TensorSpec {
            datatype: DataType::from_proto(p.datatype)?,
            name: p.name,
            shape: p.shape,
        })
    }
}

/// A dense tensor: `data` is row-major, little-endian, `element_count * datatype.size()` bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: DataType,
    pub data: Vec<u8>,
}

/// Refuses a value whose magnitude is beyond `max`, the largest finite value of `datatype`.
fn in_range(name: &str, datatype: &str, values: &[f64], max: f64) -> Result<(), ApiError> {
    match values.iter().find(|x| x.abs() > max) {
        Some(x) => Err(ApiError::bad_request(format!(
            "tensor {name:?}: value {x} is outside the {datatype} range (±{max})"
        ))),
        None => Ok(()),
    }
}

/// Number of elements of a concrete shape, or an error naming the bad dimension.
pub fn element_count(name: &str, shape: &[i64]) -> Result<usize, ApiError> {
    let mut n: usize = 1;
    for &d in shape {
        let d = usize::try_from(d).map_err(|_| {
            ApiError::bad_request(format!(
                "tensor {name:?}: negative dimension in shape {shape:?}"
            ))
        })?;
        n = n.checked_mul(d).ok_or_else(|| {
            ApiError::bad_request(format!("tensor {name:?}: shape {shape:?} is too large"))
        })?;
    }
    Ok(n)
}

impl Tensor {
    /// Builds a tensor, checking that `data` has exactly the bytes `shape` and `datatype` need.
    pub fn new(
        name: impl Into<String>,
        shape: Vec<i64>,
        datatype: DataType,
        data: Vec<u8>,
    ) -> Result<Tensor, ApiError> {
        let name = name.into();
        let want = element_count(&name, &shape)?
            .checked_mul(datatype.size())
            .ok_or_else(|| ApiError::bad_request(format!("tensor {name:?} is too large")))?;
        if data.len() != want {
            return Err(ApiError::bad_request(format!(
                "tensor {name:?}: shape {shape:?} of {datatype} needs {want} bytes, got {}",
                data.len()
            )));
        }
        Ok(Tensor {
            name,
            shape,
            datatype,
            data,
        })
    }

    pub fn from_f32(
        name: impl Into<String>,
        shape: Vec<i64>,
        values: &[f32],
    ) -> Result<Tensor, ApiError> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::new(name, shape, DataType::Fp32, data)
    }

    /// The elements as `f32` when the datatype is `FP32`.
    pub fn as_f32(&self) -> Option<Vec<f32>> {
        (self.datatype == DataType::Fp32).then(|| {
            self.data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }

    pub fn to_proto(&self) -> pb::Tensor {
        pb::Tensor {
            name: self.name.clone(),
            shape: self.shape.clone(),
            datatype: self.datatype.to_proto() as i32,
            data: self.data.clone(),
        }
    }

    pub fn into_proto(self) -> pb::Tensor {
        pb::Tensor {
            name: self.name,
            shape: self.shape,
            datatype: self.datatype.to_proto() as i32,
            data: self.data,
        }
    }

    /// Parses one tensor of the JSON API.
    pub fn from_json(json: &JsonTensor) -> Result<Tensor, ApiError> {
        let name = &json.name;
        let count = element_count(name, &json.shape)?;
        let raw = json.data.get();
        let bad = |e: serde_json::Error| {
            ApiError::bad_request(format!(
                "tensor {name:?}: data is not a flat array of {} values: {e}",
                json.datatype
            ))
        };
        fn le<T, const N: usize>(values: Vec<T>, f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            values.into_iter().flat_map(f).collect()
        }
        let (len, data) = match json.datatype {
            DataType::Bool => {
                let v: Vec<bool> = serde_json::from_str(raw).map_err(bad)?;
                (v.len(), v.into_iter().map(u8::from).collect())
            }
            DataType::Uint8 => {
                let v: Vec<u8> = serde_json::from_str(raw).map_err(bad)?;
                (v.len(), v)
            }
            DataType::Int8 => {
                let v: Vec<i8> = serde_json::from_str(raw).map_err(bad)?;
                (v.len(), le(v, i8::to_le_bytes))
            }
            DataType::Int32 => {
                let v: Vec<i32> = serde_json::from_str(raw).map_err(bad)?;
                (v.len(), le(v, i32::to_le_bytes))
            }
            DataType::Int64 => {
                let v: Vec<i64> = serde_json::from_str(raw).map_err(bad)?;
                (v.len(), le(v, i64::to_le_bytes))
            }
            // A value beyond the datatype's range is refused, not turned into an infinity (found
            // by fuzzing: -3e5 as FP16 became -inf).
            DataType::Fp16 => {
                let v: Vec<f64> = serde_json::from_str(raw).map_err(bad)?;
                in_range(name, "FP16", &v, f64::from(f16::MAX))?;
                (v.len(), le(v, |x| f16::from_f64(x).to_le_bytes()))
            }
            DataType::Fp32 => {
                let v: Vec<f64> = serde_json::from_str(raw).map_err(bad)?;
                in_range(name, "FP32", &v, f64::from(f32::MAX))?;
                (v.len(), le(v, |x| (x as f32).to_le_bytes()))
            }
            DataType::Fp64 => {
                let v: Vec<f64> = serde_json::from_str(raw).map_err(bad)?;
                (v.len(), le(v, f64::to_le_bytes))
            }
        };
        if len != count {
            return Err(ApiError::bad_request(format!(
                "tensor {name:?}: shape {:?} needs {count} values, got {len}",
                json.shape
            )));
        }
        Tensor::new(name.clone(), json.shape.clone(), json.datatype, data)
    }

    /// The JSON form of the API, with `data` as a flat array of numbers (or booleans).
    pub fn to_json(&self) -> serde_json::Value {
        fn arr<const N: usize, T: Into<serde_json::Value>>(
            data: &[u8],
            f: impl Fn([u8; N]) -> T,
        ) -> serde_json::Value {
            data.chunks_exact(N)
                .map(|c| f(c.try_into().expect("chunks_exact yields N bytes")).into())
                .collect::<Vec<serde_json::Value>>()
                .into()
        }
        // f32 goes through its shortest decimal form, so 0.1f32 prints as 0.1, not 0.10000000149.
        fn short(x: f32) -> serde_json::Value {
            if x.is_finite() {
                x.to_string()
                    .parse::<f64>()
                    .map(serde_json::Value::from)
                    .unwrap_or_default()
            } else {
                serde_json::Value::Null
            }
        }
        let data = match self.datatype {
            DataType::Bool => arr::<1, _>(&self.data, |b| b[0] != 0),
            DataType::Uint8 => arr::<1, _>(&self.data, |b| b[0]),
            DataType::Int8 => arr::<1, _>(&self.data, i8::from_le_bytes),
            DataType::Int32 => arr::<4, _>(&self.data, i32::from_le_bytes),
            DataType::Int64 => arr::<8, _>(&self.data, i64::from_le_bytes),
            DataType::Fp16 => arr::<2, _>(&self.data, |b| short(f16::from_le_bytes(b).to_f32())),
            DataType::Fp32 => arr::<4, _>(&self.data, |b| short(f32::from_le_bytes(b))),
            DataType::Fp64 => arr::<8, _>(&self.data, |b| {
                let x = f64::from_le_bytes(b);
                if x.is_finite() {
                    serde_json::Value::from(x)
                } else {
                    serde_json::Value::Null
                }
            }),
        };
        serde_json::json!({
            "name": self.name,
            "shape": self.shape,
            "datatype": self.datatype,
            "data": data,
        })
    }
}

impl TryFrom<pb::Tensor> for Tensor {
    type Error = ApiError;

    fn try_from(p: pb::Tensor) -> Result<Self, ApiError> {
        let datatype = DataType::from_proto(p.datatype)?;
        Tensor::new(p.name, p.shape, datatype, p.data)
    }
}

/// One tensor of the JSON API as received; `data` is parsed once the datatype is known.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: DataType,
    pub data: Box<RawValue>,
    #[serde(default)]
    pub parameters: Option<serde_json::Value>,
}

/// Checks request tensors against a model's declared inputs: every input present once, no
/// unknown names, the declared datatype, and the declared shape (any size where it is `-1`).
pub fn validate_inputs(specs: &[TensorSpec], inputs: &[Tensor]) -> Result<(), ApiError> {
    let names = || {
        specs
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (i, t) in inputs.iter().enumerate() {
        if inputs[..i].iter().any(|o| o.name == t.name) {
            return Err(ApiError::bad_request(format!(
                "input {:?} is given twice",
                t.name
            )));
        }
        let Some(spec) = specs.iter().find(|s| s.name == t.name) else {
            return Err(ApiError::bad_request(format!(
                "unknown input {:?} (the model's inputs are: {})",
                t.name,
                names()
            )));
        };
        if spec.datatype != t.datatype {
            return Err(ApiError::bad_request(format!(
                "input {:?}: expected datatype {}, got {}",
                t.name, spec.datatype, t.datatype
            )));
        }
        let fits = spec.shape.len() == t.shape.len()
            && spec
                .shape
                .iter()
                .zip(&t.shape)
                .all(|(&want, &got)| want < 0 || want == got);
        if !fits {
            return Err(ApiError::bad_request(format!(
                "input {:?}: expected shape {:?} (-1 = any size), got {:?}",
                t.name, spec.shape, t.shape
            )));
        }
    }
    if let Some(missing) = specs
        .iter()
        .find(|s| !inputs.iter().any(|t| t.name == s.name))
    {
        return Err(ApiError::bad_request(format!(
            "missing input {:?}",
            missing.name
        )));
    }
    Ok(())
}

/// The rows a request asks predictions for, what it is charged for: the largest first
/// dimension among the inputs whose declared first dimension is dynamic (-1); 1 when the model
/// fixes it (one call per request). For inputs that passed [`validate_inputs`].
pub fn batch_rows(specs: &[TensorSpec], inputs: &[Tensor]) -> u64 {
    inputs
        .iter()
        .filter(|t| {
            specs
                .iter()
                .any(|s| s.name == t.name && s.shape.first().is_some_and(|&d| d < 0))
        })
        .filter_map(|t| t.shape.first().and_then(|&d| u64::try_from(d).ok()))
        .max()
        .unwrap_or(1)
        .max(1)
}

/// The range a model's input values lie in, declared by its creator at upload (`[0, 1]` by
/// default): calibration samples are drawn from it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InputRange {
    pub min: f32,
    pub max: f32,
}

impl Default for InputRange {
    fn default() -> Self {
        InputRange { min: 0.0, max: 1.0 }
    }
}

/// Largest input magnitude a declared range may reach.
pub const MAX_INPUT_MAGNITUDE: f32 = 1.0e6;

impl InputRange {
    /// A range from its bounds: finite, `min < max`, within ±[`MAX_INPUT_MAGNITUDE`].
    pub fn new(min: f32, max: f32) -> Result<InputRange, String> {
        let ok = |v: f32| v.is_finite() && v.abs() <= MAX_INPUT_MAGNITUDE;
        if !ok(min) || !ok(max) || min >= max {
            return Err(format!(
                "input range [{min}, {max}] must have finite bounds within ±{MAX_INPUT_MAGNITUDE:e} and min < max"
            ));
        }
        Ok(InputRange { min, max })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn json(s: &str) -> JsonTensor {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn float_values_read_back_exactly_as_written() {
        // Found by fuzzing: the default JSON number parser read -3e72 one ULP off.
        let text = r#"{"name":"x","shape":[3],"datatype":"FP64","data":[5.5,-3e72,1.7976931348623157e308]}"#;
        let t = Tensor::from_json(&json(text)).unwrap();
        let values: Vec<f64> = t
            .data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(values, vec![5.5, -3e72, 1.797_693_134_862_315_7e308]);
        let again: JsonTensor = serde_json::from_value(t.to_json()).unwrap();
        assert_eq!(Tensor::from_json(&again).unwrap(), t);
    }

    #[test]
    fn values_beyond_a_float_type_s_range_are_refused_not_made_infinite() {
        for (datatype, data, ok) in [
            ("FP16", "[65504.0, -65504.0]", true),
            ("FP16", "[-3e5]", false),
            ("FP16", "[65600.0]", false),
            ("FP32", "[3.4e38]", true),
            ("FP32", "[1e39]", false),
            ("FP64", "[1e300]", true),
        ] {
            let n = data.matches(',').count() + 1;
            let text =
                format!(r#"{{"name":"x","shape":[{n}],"datatype":"{datatype}","data":{data}}}"#);
            let got = Tensor::from_json(&json(&text));
            assert_eq!(got.is_ok(), ok, "{datatype} {data}: {got:?}");
            if let Err(e) = got {
                assert_eq!(e.code, ErrorCode::BadRequest);
                assert!(e.message.contains("outside the"), "{}", e.message);
            }
        }
    }

    #[test]
    fn a_batch_has_as_many_rows_as_its_dynamic_first_dimension() {
        let spec = |name: &str, shape: Vec<i64>| TensorSpec {
            name: name.into(),
            datatype: DataType::Fp32,
            shape,
        };
        let input = |name: &str, shape: Vec<i64>| Tensor {
            name: name.into(),
            shape,
            datatype: DataType::Fp32,
            data: Vec::new(),
        };
        let dynamic = [spec("x", vec![-1, 64]), spec("mask", vec![-1, 4])];
        assert_eq!(
            batch_rows(
                &dynamic,
                &[input("x", vec![7, 64]), input("mask", vec![7, 4])]
            ),
            7
        );
        // A fixed first dimension is one call per request, whatever its size.
        let fixed = [spec("x", vec![32, 64])];
        assert_eq!(batch_rows(&fixed, &[input("x", vec![32, 64])]), 1);
        // An empty batch is still a call.
        assert_eq!(batch_rows(&dynamic[..1], &[input("x", vec![0, 64])]), 1);
        // A scalar input has no rows.
        assert_eq!(batch_rows(&[spec("s", vec![])], &[input("s", vec![])]), 1);
    }

    #[test]
    fn every_datatype_round_trips_through_json() {
        let cases = [
            ("BOOL", "[true,false,true,true]"),
            ("UINT8", "[0,1,254,255]"),
            ("INT8", "[-128,-1,0,127]"),
            ("INT32", "[-2147483648,0,7,2147483647]"),
            ("INT64", "[-9007199254740993,0,1,9007199254740993]"),
            ("FP16", "[0.5,-2.0,65504.0,0.0]"),
            ("FP32", "[0.1,-2.5,3.0e10,0.0]"),
            ("FP64", "[0.1,-2.5,1e300,0.0]"),
        ];
        for (dt, data) in cases {
            let src = format!(r#"{{"name":"x","shape":[2,2],"datatype":"{dt}","data":{data}}}"#);
            let t = Tensor::from_json(&json(&src)).unwrap();
            assert_eq!(t.data.len(), 4 * t.datatype.size(), "{dt}");
            let back = t.to_json();
            let again = Tensor::from_json(&json(&back.to_string())).unwrap();
            assert_eq!(again, t, "{dt}");
            let proto = Tensor::try_from(t.to_proto()).unwrap();
            assert_eq!(proto, t, "{dt}");
        }
    }

    #[test]
    fn f32_prints_in_shortest_form() {
        let t = Tensor::from_f32("y", vec![1], &[0.1]).unwrap();
        assert_eq!(t.to_json()["data"].to_string(), "[0.1]");
    }

    #[test]
    fn wrong_element_count_is_rejected_with_the_numbers() {
        let e = Tensor::from_json(&json(
            r#"{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2]}"#,
        ))
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("needs 3 values, got 2"), "{}", e.message);
    }

    #[test]
    fn wrong_value_type_is_rejected() {
        let e = Tensor::from_json(&json(
            r#"{"name":"x","shape":[1],"datatype":"INT8","data":[300]}"#,
        ))
        .unwrap_err();
        assert!(e.message.contains("INT8"), "{}", e.message);
        let e = Tensor::from_json(&json(
            r#"{"name":"x","shape":[-1],"datatype":"FP32","data":[1]}"#,
        ))
        .unwrap_err();
        assert!(e.message.contains("negative dimension"), "{}", e.message);
        assert!(
            serde_json::from_str::<JsonTensor>(
                r#"{"name":"x","shape":[1],"datatype":"FP128","data":[1]}"#
            )
            .is_err()
        );
    }

    #[test]
    fn inputs_are_checked_against_the_signature() {
        let specs = vec![TensorSpec {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![-1, 4],
        }];
        let ok = Tensor::from_f32("x", vec![2, 4], &[0.0; 8]).unwrap();
        validate_inputs(&specs, std::slice::from_ref(&ok)).unwrap();

        let shape = Tensor::from_f32("x", vec![2, 3], &[0.0; 6]).unwrap();
        let e = validate_inputs(&specs, &[shape]).unwrap_err();
        assert!(
            e.message.contains("expected shape [-1, 4]"),
            "{}",
            e.message
        );

        let name = Tensor::from_f32("y", vec![1, 4], &[0.0; 4]).unwrap();
        let e = validate_inputs(&specs, &[name]).unwrap_err();
        assert!(e.message.contains("unknown input \"y\""), "{}", e.message);

        let dt = Tensor::new("x", vec![1, 4], DataType::Int32, vec![0; 16]).unwrap();
        let e = validate_inputs(&specs, &[dt]).unwrap_err();
        assert!(
            e.message.contains("expected datatype FP32, got INT32"),
            "{}",
            e.message
        );

        let e = validate_inputs(&specs, &[]).unwrap_err();
        assert!(e.message.contains("missing input \"x\""), "{}", e.message);

        let e = validate_inputs(&specs, &[ok.clone(), ok]).unwrap_err();
        assert!(e.message.contains("twice"), "{}", e.message);
    }

    #[test]
    fn bad_input_ranges_are_refused() {
        for (min, max) in [
            (1.0, 1.0),
            (2.0, -2.0),
            (f32::NAN, 1.0),
            (0.0, f32::INFINITY),
            (-2.0e6, 0.0),
        ] {
            let e = InputRange::new(min, max).unwrap_err();
            assert!(e.contains("input range"), "{e}");
        }
        assert_eq!(InputRange::new(0.0, 1.0), Ok(InputRange::default()));
    }
}
