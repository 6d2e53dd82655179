// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Byte strings as lowercase hex in the JSON payload: readable, and one
//! canonical spelling per value (so decode then encode gives the same bytes).

use serde::de::{Error, Visitor};
use serde::{Deserializer, Serializer};

const DIGITS: &[u8; 16] = b"0123456789abcdef";

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

pub(crate) fn from_hex(s: &str) -> Result<Vec<u8>, &'static str> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return Err("odd number of hex digits");
    }
    s.chunks_exact(2)
        .map(|pair| match (nibble(pair[0]), nibble(pair[1])) {
            (Some(hi), Some(lo)) => Ok(hi << 4 | lo),
            _ => Err("not a lowercase hex digit"),
        })
        .collect()
}

pub(crate) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&to_hex(bytes))
}

pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    struct HexVisitor;

    impl Visitor<'_> for HexVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string of lowercase hex digit pairs")
        }

        fn visit_str<E: Error>(self, v: &str) -> Result<Vec<u8>, E> {
            from_hex(v).map_err(E::custom)
        }
    }

    d.deserialize_str(HexVisitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_refusals() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&all)).unwrap(), all);
        assert_eq!(to_hex(&[0x00, 0xab, 0xff]), "00abff");
        assert!(from_hex("abc").is_err());
        assert!(from_hex("AB").is_err());
        assert!(from_hex("0g").is_err());
        assert!(from_hex("").unwrap().is_empty());
    }
}
