//! Sizes in bytes as people write them (`256M`, `1G`) and as the config file stores them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A size written with a unit (`K`, `M`, `G`, `T`, optionally followed by `B` or `iB`, all
/// powers of 1024) or as a plain number in the parser's [`SizeUnit`].
///
/// In JSON a number means MiB and a string is parsed like the command line; whole MiB are
/// written back as numbers, so `"memory": 256` survives a round trip unchanged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(u64);

/// The unit of a plain number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeUnit {
    Byte,
    Mib,
}

/// A size that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("Invalid size '{0}' (examples: 256M, 1G)")]
    Invalid(String),
    #[error("Size '{0}' is too large")]
    TooLarge(String),
}

impl ByteSize {
    pub const fn from_bytes(bytes: u64) -> Self {
        Self(bytes)
    }

    /// `mib` MiB, or None when that overflows.
    pub const fn from_mib(mib: u64) -> Option<Self> {
        match mib.checked_mul(1 << 20) {
            Some(bytes) => Some(Self(bytes)),
            None => None,
        }
    }

    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// Whole MiB, rounded down.
    pub const fn mib(self) -> u64 {
        self.0 >> 20
    }

    /// Parses `text`, reading a number without a unit as `plain`.
    pub fn parse(text: &str, plain: SizeUnit) -> Result<Self, SizeError> {
        let trimmed = text.trim();
        let unit_start = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(trimmed.len());
        let (digits, unit) = trimmed.split_at(unit_start);
        let number: u64 = digits
            .parse()
            .map_err(|_| SizeError::Invalid(text.to_owned()))?;
        let shift = match unit.trim().to_ascii_uppercase().as_str() {
            "" => match plain {
                SizeUnit::Byte => 0,
                SizeUnit::Mib => 20,
            },
            "B" => 0,
            "K" | "KB" | "KIB" => 10,
            "M" | "MB" | "MIB" => 20,
            "G" | "GB" | "GIB" => 30,
            "T" | "TB" | "TIB" => 40,
            _ => return Err(SizeError::Invalid(text.to_owned())),
        };
        number
            .checked_mul(1 << shift)
            .map(Self)
            .ok_or_else(|| SizeError::TooLarge(text.to_owned()))
    }
}

impl FromStr for ByteSize {
    type Err = SizeError;

    /// A plain number is MiB, as for `--memory`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s, SizeUnit::Mib)
    }
}

impl fmt::Display for ByteSize {
    /// The largest unit that divides the size: `2G`, `256M`, `65536K`, `1000B`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.0;
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if bytes != 0 && bytes.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", bytes >> shift);
            }
        }
        write!(f, "{bytes}B")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.0.is_multiple_of(1 << 20) {
            serializer.serialize_u64(self.mib())
        } else {
            serializer.collect_str(self)
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Mib(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Mib(mib) => {
                Self::from_mib(mib).ok_or_else(|| serde::de::Error::custom("size overflows"))
            }
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_plain_numbers() {
        let mib = |s: &str| ByteSize::parse(s, SizeUnit::Mib).map(ByteSize::bytes);
        assert_eq!(mib("256M"), Ok(256 << 20));
        assert_eq!(mib("1G"), Ok(1 << 30));
        assert_eq!(mib("2GiB"), Ok(2 << 30));
        assert_eq!(mib("512"), Ok(512 << 20));
        assert_eq!(mib("65536K"), Ok(64 << 20));
        assert_eq!(mib(" 3 T "), Ok(3 << 40));
        assert_eq!(
            ByteSize::parse("4096", SizeUnit::Byte).map(ByteSize::bytes),
            Ok(4096)
        );
        for bad in ["", "M", "12X", "-5M", "1.5G"] {
            assert_eq!(mib(bad), Err(SizeError::Invalid(bad.into())), "{bad}");
        }
        assert_eq!(
            mib("99999999999999999999T"),
            Err(SizeError::Invalid("99999999999999999999T".into()))
        );
        assert_eq!(
            mib("9999999999T"),
            Err(SizeError::TooLarge("9999999999T".into()))
        );
    }

    #[test]
    fn displays_in_the_largest_dividing_unit() {
        let show = |bytes: u64| ByteSize::from_bytes(bytes).to_string();
        assert_eq!(show(256 << 20), "256M");
        assert_eq!(show(2 << 30), "2G");
        assert_eq!(show(3 << 40), "3T");
        assert_eq!(show(1536 << 10), "1536K");
        assert_eq!(show(1000), "1000B");
        assert_eq!(show(0), "0B");
        for bytes in [0, 1000, 1536 << 10, 256 << 20, 3 << 40] {
            assert_eq!(show(bytes).parse::<ByteSize>().unwrap().bytes(), bytes);
        }
    }

    #[test]
    fn json_numbers_are_mib_and_whole_mib_stay_numbers() {
        let size: ByteSize = serde_json::from_str("512").unwrap();
        assert_eq!(size.bytes(), 512 << 20);
        assert_eq!(serde_json::to_string(&size).unwrap(), "512");
        let size: ByteSize = serde_json::from_str("\"1536K\"").unwrap();
        assert_eq!(serde_json::to_string(&size).unwrap(), "\"1536K\"");
        assert!(serde_json::from_str::<ByteSize>("\"lots\"").is_err());
        assert!(serde_json::from_str::<ByteSize>(&u64::MAX.to_string()).is_err());
        assert_eq!(ByteSize::from_mib(u64::MAX), None);
    }
}
