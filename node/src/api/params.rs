//! Query-string parameters, parsed with errors that name the parameter.

use std::collections::HashMap;

use alloy::primitives::{Address, U256};
use axum::http::StatusCode;

use super::error::ApiError;

pub type Params = HashMap<String, String>;

fn bad(name: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_parameter", format!("parameter `{name}`: {why}"))
}

/// Refuses parameters the endpoint does not know (a typo must not silently widen a query).
pub fn only(params: &Params, known: &[&str]) -> Result<(), ApiError> {
    match params.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => {
            Err(bad(unknown, format!("unknown parameter; expected one of {}", known.join(", "))))
        }
        None => Ok(()),
    }
}

pub fn address(params: &Params, name: &str) -> Result<Option<Address>, ApiError> {
    params
        .get(name)
        .map(|v| v.parse::<Address>().map_err(|e| bad(name, format!("not an address ({e})"))))
        .transpose()
}

pub fn u256(params: &Params, name: &str) -> Result<Option<U256>, ApiError> {
    params.get(name).map(|v| parse_u256(v).map_err(|why| bad(name, why))).transpose()
}

pub fn u64(params: &Params, name: &str) -> Result<Option<u64>, ApiError> {
    params
        .get(name)
        .map(|v| v.parse::<u64>().map_err(|e| bad(name, format!("not an unsigned 64-bit integer ({e})"))))
        .transpose()
}

/// A uint256 id from the path (`what` names it in the error: "token id", "license id").
pub fn path_id(what: &str, raw: &str) -> Result<U256, ApiError> {
    parse_u256(raw).map_err(|why| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_parameter", format!("{what} `{raw}`: {why}"))
    })
}

/// A parameter that must be there.
pub fn required<T>(value: Option<T>, name: &str) -> Result<T, ApiError> {
    value.ok_or_else(|| bad(name, "is required"))
}

pub fn parse_u256(v: &str) -> Result<U256, String> {
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => U256::from_str_radix(hex, 16),
        None => U256::from_str_radix(v, 10),
    };
    parsed.map_err(|e| format!("not an unsigned 256-bit integer ({e})"))
}

pub fn limit(params: &Params, default: usize, max: usize) -> Result<usize, ApiError> {
    match params.get("limit") {
        None => Ok(default),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(bad("limit", format!("must be an integer from 1 to {max}"))),
        },
    }
}

pub fn one_of<'a>(
    params: &Params,
    name: &str,
    allowed: &[&'a str],
    default: &'a str,
) -> Result<&'a str, ApiError> {
    match params.get(name) {
        None => Ok(default),
        Some(v) => allowed
            .iter()
            .copied()
            .find(|a| a == v)
            .ok_or_else(|| bad(name, format!("must be one of {}", allowed.join(", ")))),
    }
}
