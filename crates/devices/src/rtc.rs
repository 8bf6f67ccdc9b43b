//! The CMOS real-time clock (MC146818) on ports 0x70 (index) and 0x71 (data).
//!
//! Without it the kernel's CMOS clock read sees 0xff everywhere, including the "update in
//! progress" bit it waits on. This one reports the host's UTC time (plus whatever offset the
//! guest set by writing the time registers), in BCD or binary and 24- or 12-hour format as
//! register B selects, never reports an update in progress, and keeps the rest of the
//! 128-byte CMOS RAM as plain storage. It raises no interrupts.

use std::time::{SystemTime, UNIX_EPOCH};

use lodge_bus::BusDevice;

/// The index port; the data port follows it.
pub const RTC_PORT: u16 = 0x70;
/// Index and data ports.
pub const RTC_PORT_COUNT: u64 = 2;

/// Where the clock reads the current time from.
pub type ClockSource = Box<dyn Fn() -> SystemTime + Send>;

const INDEX_OFFSET: u64 = 0;
const DATA_OFFSET: u64 = 1;

/// Bit 7 of the index port masks NMIs on a PC; there are no NMIs to mask here.
const INDEX_MASK: u8 = 0x7f;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_DAY_OF_WEEK: u8 = 0x06;
const REG_DAY_OF_MONTH: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
/// The century byte most firmware (and ACPI's FADT default) uses.
const REG_CENTURY: u8 = 0x32;

/// Register A: 32.768 kHz time base, 1024 Hz periodic rate; bit 7 (update in progress) clear.
const REG_A_DEFAULT: u8 = 0x26;
const REG_A_UPDATE_IN_PROGRESS: u8 = 0x80;
const REG_B_BINARY: u8 = 0x04;
const REG_B_24_HOUR: u8 = 0x02;
/// Register D bit 7: the battery is fine and the RAM and time are valid.
const REG_D_VALID: u8 = 0x80;
const HOUR_PM: u8 = 0x80;

const SECONDS_PER_DAY: i64 = 86_400;

/// The CMOS RTC; see the module documentation.
pub struct CmosRtc {
    clock: ClockSource,
    /// Seconds the guest moved its clock away from the host's.
    offset: i64,
    index: u8,
    ram: [u8; 128],
}

impl CmosRtc {
    /// A clock that follows the host's time.
    pub fn new() -> Self {
        Self::with_clock(Box::new(SystemTime::now))
    }

    /// A clock that reads the time from `clock` (tests use a fixed one).
    pub fn with_clock(clock: ClockSource) -> Self {
        let mut ram = [0u8; 128];
        ram[usize::from(REG_A)] = REG_A_DEFAULT;
        ram[usize::from(REG_B)] = REG_B_24_HOUR;
        Self {
            clock,
            offset: 0,
            index: 0,
            ram,
        }
    }

    fn register_b(&self) -> u8 {
        self.ram[usize::from(REG_B)]
    }

    fn now(&self) -> i64 {
        let host = match (self.clock)().duration_since(UNIX_EPOCH) {
            Ok(since_epoch) => i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX),
            Err(_) => 0,
        };
        host.saturating_add(self.offset)
    }

    fn read_register(&self, index: u8) -> u8 {
        let time = DateTime::from_unix(self.now());
        let value = match index {
            REG_SECONDS => time.second,
            REG_MINUTES => time.minute,
            REG_HOURS => return self.encode_hour(time.hour),
            REG_DAY_OF_WEEK => time.day_of_week,
            REG_DAY_OF_MONTH => time.day,
            REG_MONTH => time.month,
            REG_YEAR => time.year.rem_euclid(100) as u8,
            REG_CENTURY => time.year.div_euclid(100).clamp(0, 99) as u8,
            REG_A => return self.ram[usize::from(REG_A)] & !REG_A_UPDATE_IN_PROGRESS,
            // No interrupt flags are ever raised; reading C clears nothing.
            REG_C => return 0,
            REG_D => return REG_D_VALID,
            _ => return self.ram[usize::from(index & INDEX_MASK)],
        };
        self.encode(value)
    }

    fn write_register(&mut self, index: u8, value: u8) {
        match index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY_OF_MONTH | REG_MONTH | REG_YEAR
            | REG_CENTURY => self.set_time_field(index, value),
            // Derived from the date; read-only here.
            REG_DAY_OF_WEEK | REG_C | REG_D => {}
            REG_A => {
                self.ram[usize::from(REG_A)] = value & !REG_A_UPDATE_IN_PROGRESS;
            }
            _ => self.ram[usize::from(index & INDEX_MASK)] = value,
        }
    }

    fn set_time_field(&mut self, index: u8, value: u8) {
        let mut time = DateTime::from_unix(self.now());
        let decoded = if index == REG_HOURS {
            self.decode_hour(value)
        } else {
            self.decode(value)
        };
        let Some(field) = decoded else {
            tracing::debug!("RTC: ignored malformed value {value:#04x} for register {index:#04x}");
            return;
        };
        match index {
            REG_SECONDS => time.second = field,
            REG_MINUTES => time.minute = field,
            REG_HOURS => time.hour = field,
            REG_DAY_OF_MONTH => time.day = field,
            REG_MONTH => time.month = field,
            REG_YEAR => time.year = time.year.div_euclid(100) * 100 + i64::from(field),
            REG_CENTURY => time.year = i64::from(field) * 100 + time.year.rem_euclid(100),
            _ => return,
        }
        let host = self.now().saturating_sub(self.offset);
        self.offset = time.to_unix().saturating_sub(host);
    }

    fn encode(&self, value: u8) -> u8 {
        if self.register_b() & REG_B_BINARY != 0 {
            value
        } else {
            ((value / 10) << 4) | (value % 10)
        }
    }

    fn decode(&self, value: u8) -> Option<u8> {
        if self.register_b() & REG_B_BINARY != 0 {
            return Some(value);
        }
        let (high, low) = (value >> 4, value & 0x0f);
        (high < 10 && low < 10).then_some(high * 10 + low)
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.register_b() & REG_B_24_HOUR != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { HOUR_PM } else { 0 };
        let twelve_hour = match hour % 12 {
            0 => 12,
            other => other,
        };
        self.encode(twelve_hour) | pm
    }

    fn decode_hour(&self, value: u8) -> Option<u8> {
        if self.register_b() & REG_B_24_HOUR != 0 {
            return self.decode(value).filter(|hour| *hour < 24);
        }
        let hour = self
            .decode(value & !HOUR_PM)
            .filter(|hour| (1..=12).contains(hour))?;
        let pm = value & HOUR_PM != 0;
        Some(hour % 12 + if pm { 12 } else { 0 })
    }
}

impl Default for CmosRtc {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for CmosRtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (DATA_OFFSET, 1) => self.read_register(self.index),
            // The index port is write-only.
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (INDEX_OFFSET, [index]) => self.index = index & INDEX_MASK,
            (DATA_OFFSET, [value]) => self.write_register(self.index, *value),
            _ => {}
        }
    }
}

/// A UTC calendar time, in the ranges the RTC registers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 1 is Sunday.
    day_of_week: u8,
}

impl DateTime {
    fn from_unix(seconds: i64) -> Self {
        let days = seconds.div_euclid(SECONDS_PER_DAY);
        let of_day = seconds.rem_euclid(SECONDS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            hour: (of_day / 3600) as u8,
            minute: (of_day / 60 % 60) as u8,
            second: (of_day % 60) as u8,
            // 1970-01-01 was a Thursday.
            day_of_week: ((days + 4).rem_euclid(7) + 1) as u8,
        }
    }

    /// Out-of-range fields (a guest writing day 31 in a 30-day month) carry into the next
    /// unit, as `days_from_civil` does.
    fn to_unix(self) -> i64 {
        let days = days_from_civil(self.year, self.month, self.day);
        days.saturating_mul(SECONDS_PER_DAY)
            .saturating_add(i64::from(self.hour) * 3600)
            .saturating_add(i64::from(self.minute) * 60)
            .saturating_add(i64::from(self.second))
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let month = i64::from(month.clamp(1, 12));
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date `days` after 1970-01-01, as (year, month 1-12, day 1-31).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u8;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u8;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// 2024-02-29 13:45:07 UTC, a Thursday.
    const FIXED: u64 = 1_709_214_307;

    fn rtc_at(seconds: u64) -> CmosRtc {
        CmosRtc::with_clock(Box::new(move || UNIX_EPOCH + Duration::from_secs(seconds)))
    }

    fn read(rtc: &mut CmosRtc, index: u8) -> u8 {
        rtc.write(INDEX_OFFSET, &[index]);
        let mut data = [0u8];
        rtc.read(DATA_OFFSET, &mut data);
        data[0]
    }

    fn write(rtc: &mut CmosRtc, index: u8, value: u8) {
        rtc.write(INDEX_OFFSET, &[index]);
        rtc.write(DATA_OFFSET, &[value]);
    }

    #[test]
    fn reads_the_time_in_bcd_by_default() {
        let mut rtc = rtc_at(FIXED);
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x07);
        assert_eq!(read(&mut rtc, REG_MINUTES), 0x45);
        assert_eq!(read(&mut rtc, REG_HOURS), 0x13);
        assert_eq!(read(&mut rtc, REG_DAY_OF_WEEK), 5);
        assert_eq!(read(&mut rtc, REG_DAY_OF_MONTH), 0x29);
        assert_eq!(read(&mut rtc, REG_MONTH), 0x02);
        assert_eq!(read(&mut rtc, REG_YEAR), 0x24);
        assert_eq!(read(&mut rtc, REG_CENTURY), 0x20);
    }

    #[test]
    fn binary_and_twelve_hour_modes_follow_register_b() {
        let mut rtc = rtc_at(FIXED);
        write(&mut rtc, REG_B, REG_B_BINARY | REG_B_24_HOUR);
        assert_eq!(read(&mut rtc, REG_MINUTES), 45);
        assert_eq!(read(&mut rtc, REG_HOURS), 13);
        assert_eq!(read(&mut rtc, REG_YEAR), 24);
        write(&mut rtc, REG_B, REG_B_BINARY);
        assert_eq!(read(&mut rtc, REG_HOURS), 1 | HOUR_PM);
        write(&mut rtc, REG_B, 0);
        assert_eq!(read(&mut rtc, REG_HOURS), 0x01 | HOUR_PM);
        let mut midnight = rtc_at(FIXED - 13 * 3600 - 45 * 60);
        write(&mut midnight, REG_B, 0);
        assert_eq!(read(&mut midnight, REG_HOURS), 0x12);
    }

    #[test]
    fn status_registers_never_report_an_update_in_progress() {
        let mut rtc = rtc_at(FIXED);
        assert_eq!(read(&mut rtc, REG_A) & REG_A_UPDATE_IN_PROGRESS, 0);
        write(&mut rtc, REG_A, 0xff);
        assert_eq!(read(&mut rtc, REG_A), 0x7f);
        assert_eq!(read(&mut rtc, REG_B), REG_B_24_HOUR);
        assert_eq!(read(&mut rtc, REG_C), 0);
        assert_eq!(read(&mut rtc, REG_D), REG_D_VALID);
    }

    #[test]
    fn the_nmi_mask_bit_is_ignored() {
        let mut rtc = rtc_at(FIXED);
        assert_eq!(read(&mut rtc, 0x80 | REG_MINUTES), 0x45);
        write(&mut rtc, 0x80 | 0x40, 0xab);
        assert_eq!(read(&mut rtc, 0x40), 0xab);
    }

    #[test]
    fn guest_writes_move_the_clock() {
        let mut rtc = rtc_at(FIXED);
        write(&mut rtc, REG_YEAR, 0x25);
        write(&mut rtc, REG_MONTH, 0x12);
        write(&mut rtc, REG_DAY_OF_MONTH, 0x31);
        write(&mut rtc, REG_HOURS, 0x23);
        write(&mut rtc, REG_MINUTES, 0x59);
        write(&mut rtc, REG_SECONDS, 0x58);
        assert_eq!(rtc.now(), 1_767_225_598); // 2025-12-31 23:59:58
                                              // Malformed BCD is ignored.
        write(&mut rtc, REG_SECONDS, 0x7a);
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x58);
        // CMOS RAM is plain storage.
        write(&mut rtc, 0x7f, 0x12);
        assert_eq!(read(&mut rtc, 0x7f), 0x12);
    }

    #[test]
    fn calendar_conversion_round_trips() {
        for days in (-800_000..800_000).step_by(997) {
            let (year, month, day) = civil_from_days(days);
            assert_eq!(
                days_from_civil(year, month, day),
                days,
                "{year}-{month}-{day}"
            );
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(DateTime::from_unix(0).day_of_week, 5);
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let mut rtc = rtc_at(FIXED);
        let mut wide = [0u8; 4];
        rtc.read(DATA_OFFSET, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        rtc.read(INDEX_OFFSET, &mut wide[..1]);
        assert_eq!(wide[0], 0xff);
        rtc.write(INDEX_OFFSET, &[1, 2]);
        rtc.write(7, &[1]);
        let before_epoch = CmosRtc::with_clock(Box::new(|| UNIX_EPOCH - Duration::from_secs(5)));
        assert_eq!(before_epoch.now(), 0);
    }
}
