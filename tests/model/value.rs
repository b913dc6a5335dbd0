//! Field values as the README describes them: JSON scalars, objects and arrays kept as
//! their JSON text, one canonical text per value (what keys, distinct counts and top-N
//! items are made of), declared types read by Flink's JSON rules.

use serde_json::Value as Json;

use super::spec::Ty;

#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// An object or array, as its JSON text.
    Json(String),
}

impl Val {
    pub fn from_json(v: &Json) -> Val {
        match v {
            Json::Null => Val::Null,
            Json::Bool(b) => Val::Bool(*b),
            Json::Number(n) => n.as_i64().map_or_else(|| Val::Float(n.as_f64().unwrap_or(f64::NAN)), Val::Int),
            Json::String(s) => Val::Str(s.clone()),
            other => Val::Json(other.to_string()),
        }
    }

    /// The canonical text: `6`, `6.0` and `"6"` are all `6`.
    pub fn text(&self) -> String {
        match self {
            Val::Null => "null".into(),
            Val::Bool(b) => b.to_string(),
            Val::Int(i) => i.to_string(),
            Val::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => (*f as i64).to_string(),
            Val::Float(f) => f.to_string(),
            Val::Str(s) | Val::Json(s) => s.clone(),
        }
    }

    /// A number, or text that reads as one.
    pub fn number(&self) -> Option<f64> {
        match self {
            Val::Int(i) => Some(*i as f64),
            Val::Float(f) => Some(*f),
            Val::Str(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// As an answer shows it.
    pub fn to_json(&self) -> Json {
        match self {
            Val::Null => Json::Null,
            Val::Bool(b) => Json::Bool(*b),
            Val::Int(i) => Json::from(*i),
            Val::Float(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
            Val::Str(s) | Val::Json(s) => Json::String(s.clone()),
        }
    }

    /// The value read as a declared type (`None`: it is of another type).
    pub fn typed(&self, ty: Ty) -> Option<Val> {
        match (ty, self) {
            (Ty::Int, Val::Int(_)) | (Ty::Float, Val::Int(_) | Val::Float(_)) | (Ty::Bool, Val::Bool(_)) | (Ty::Str, Val::Str(_)) => {
                Some(self.clone())
            }
            (Ty::Int, Val::Str(s)) => {
                let t = s.trim();
                let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                t.parse::<i64>().ok().map(Val::Int)
            }
            (Ty::Float, Val::Str(s)) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()).map(Val::Float),
            (Ty::Bool, Val::Str(s)) => match s.trim().to_ascii_lowercase().as_str() {
                "true" => Some(Val::Bool(true)),
                "false" => Some(Val::Bool(false)),
                _ => None,
            },
            (Ty::Str, Val::Int(_) | Val::Float(_) | Val::Bool(_)) => Some(Val::Str(self.text())),
            _ => None,
        }
    }
}
