//! Cron expressions (`flare.Cron`): a 5-field parser and the next fire time in a time zone.
//!
//! Fields: minute (0-59), hour (0-23), day of month (1-31), month (1-12 or `jan`-`dec`),
//! day of week (0-7, 0 and 7 are Sunday, or `sun`-`sat`). Each field is `*`, a value, a
//! range `a-b`, any of those with a step (`*/5`, `1-30/2`, `10/15`: from 10 to the end),
//! or a comma list of them. The macros `@yearly` (`@annually`), `@monthly`, `@weekly`,
//! `@daily` (`@midnight`) and `@hourly` stand for their usual expressions. As in Vixie
//! cron, when both day fields are restricted a day matches if either does.
//!
//! Times are wall-clock times of the zone. Across daylight saving changes a slot fires
//! once: a wall-clock time that happens twice (fall back) fires at its first occurrence;
//! one that does not exist (spring forward) fires at the end of the gap (several such
//! slots coalesce into that one instant).

use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// A parsed cron expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CronExpr {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    /// Whether the day-of-month / day-of-week field is `*` (for the either-day rule).
    any_day: bool,
    any_weekday: bool,
}

const MONTHS: [&str; 12] =
    ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// How far ahead a next fire time is looked for (a leap day is at most 8 years away).
const HORIZON_DAYS: i64 = 366 * 8 + 2;

impl CronExpr {
    /// Parses a 5-field expression (or a macro); the error says which field is wrong.
    pub fn parse(expr: &str) -> Result<Self, String> {
        let expanded = match expr.trim().to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *".to_string(),
            "@monthly" => "0 0 1 * *".to_string(),
            "@weekly" => "0 0 * * 0".to_string(),
            "@daily" | "@midnight" => "0 0 * * *".to_string(),
            "@hourly" => "0 * * * *".to_string(),
            other => other.to_string(),
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "cron expression {expr:?} has {} fields; expected 5 (minute hour day-of-month month day-of-week)",
                fields.len()
            ));
        }
        let minutes = field(fields[0], "minute", 0, 59, &[])?;
        let hours = field(fields[1], "hour", 0, 23, &[])?;
        let days = field(fields[2], "day-of-month", 1, 31, &[])?;
        let months = field(fields[3], "month", 1, 12, &MONTHS)?;
        let mut weekdays = field(fields[4], "day-of-week", 0, 7, &WEEKDAYS)?;
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays | 1) & 0x7f;
        }
        Ok(CronExpr {
            minutes,
            hours: hours as u32,
            days: days as u32,
            months: months as u16,
            weekdays: weekdays as u8,
            any_day: fields[2].starts_with('*'),
            any_weekday: fields[4].starts_with('*'),
        })
    }

    fn day_matches(&self, d: NaiveDate) -> bool {
        if self.months & (1 << d.month()) == 0 {
            return false;
        }
        let dom = self.days & (1 << d.day()) != 0;
        let dow = self.weekdays & (1 << d.weekday().num_days_from_sunday()) != 0;
        match (self.any_day, self.any_weekday) {
            (false, false) => dom || dow,
            _ => dom && dow,
        }
    }

    /// The first fire time strictly after `after`, with wall-clock times read in `tz`;
    /// `None` if there is none within eight years (e.g. `0 0 31 2 *`).
    pub fn next_after(&self, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&tz).naive_local();
        // Wall-clock times this much before `after`'s may still map after it (DST shifts).
        let earliest = local - Duration::hours(3);
        let mut date = earliest.date();
        let last = local.date() + Duration::days(HORIZON_DAYS);
        while date <= last {
            if self.day_matches(date) {
                for h in (0..24).filter(|h| self.hours & (1 << h) != 0) {
                    for m in (0..60).filter(|m| self.minutes & (1u64 << m) != 0) {
                        let naive = date.and_hms_opt(h, m, 0).expect("valid time");
                        if naive < earliest {
                            continue;
                        }
                        if let Some(t) = instant(tz, naive) {
                            if t > after {
                                return Some(t);
                            }
                        }
                    }
                }
            }
            date = date.succ_opt()?;
        }
        None
    }
}

/// When a wall-clock time happens in `tz`: its first occurrence if it happens twice, the
/// end of the gap if it does not exist.
fn instant(tz: Tz, naive: NaiveDateTime) -> Option<DateTime<Utc>> {
    match tz.from_local_datetime(&naive) {
        LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
        LocalResult::Ambiguous(a, b) => Some(a.min(b).with_timezone(&Utc)),
        LocalResult::None => {
            (1..=24 * 60).find_map(|m| match tz.from_local_datetime(&(naive + Duration::minutes(m))) {
                LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
                LocalResult::Ambiguous(a, b) => Some(a.min(b).with_timezone(&Utc)),
                LocalResult::None => None,
            })
        }
    }
}

/// One field as a bit set of the values it matches.
fn field(text: &str, what: &str, min: u32, max: u32, names: &[&str]) -> Result<u64, String> {
    let bad = |why: &str| format!("cron {what} field {text:?}: {why}");
    let value = |s: &str| -> Result<u32, String> {
        if let Some(i) = names.iter().position(|n| *n == s) {
            return Ok(i as u32 + min);
        }
        let v: u32 = s.parse().map_err(|_| bad(&format!("{s:?} is not a number")))?;
        if v < min || v > max {
            return Err(bad(&format!("{v} is out of range ({min}-{max})")));
        }
        Ok(v)
    };
    let mut set = 0u64;
    for part in text.split(',') {
        if part.is_empty() {
            return Err(bad("empty list item"));
        }
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s.parse().map_err(|_| bad(&format!("step {s:?} is not a number")))?;
                if step == 0 || step > max {
                    return Err(bad(&format!("step {step} is out of range (1-{max})")));
                }
                (r, Some(step))
            }
            None => (part, None),
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (value(a)?, value(b)?);
            if a > b {
                return Err(bad(&format!("range {a}-{b} is backwards")));
            }
            (a, b)
        } else {
            let a = value(range)?;
            (a, if step.is_some() { max } else { a })
        };
        let mut v = lo;
        while v <= hi {
            set |= 1 << v;
            v += step.unwrap_or(1);
        }
    }
    Ok(set)
}

/// A time zone by IANA name (`Europe/Paris`, `UTC`).
pub fn timezone(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>()
        .map_err(|_| format!("unknown time zone {name:?} (expected an IANA name like \"Europe/Paris\")"))
}

/// Seconds since the epoch to a UTC time (`None` if out of range).
pub fn utc(ts: f64) -> Option<DateTime<Utc>> {
    let secs = ts.floor();
    let nanos = ((ts - secs) * 1e9) as u32;
    Utc.timestamp_opt(secs as i64, nanos.min(999_999_999)).single()
}

/// A UTC time as seconds since the epoch.
pub fn ts(t: DateTime<Utc>) -> f64 {
    t.timestamp() as f64 + f64::from(t.timestamp_subsec_nanos()) / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn next(expr: &str, tz: &str, after: &str) -> String {
        let e = CronExpr::parse(expr).unwrap();
        e.next_after(timezone(tz).unwrap(), at(after)).unwrap().to_rfc3339()
    }

    #[test]
    fn parses_fields() {
        let e = CronExpr::parse("*/15 9-17 * * mon-fri").unwrap();
        assert_eq!(e.minutes, 1 | 1 << 15 | 1 << 30 | 1 << 45);
        assert_eq!(e.hours, (9..=17).fold(0, |a, h| a | 1 << h));
        assert_eq!(e.weekdays, 0b0111110);
        assert_eq!(CronExpr::parse("0 0 * * 7").unwrap().weekdays, 1);
        assert_eq!(CronExpr::parse("0 0 * * sun,sat").unwrap().weekdays, 1 | 1 << 6);
        assert_eq!(CronExpr::parse("0 0 1 jan,dec *").unwrap().months, 1 << 1 | 1 << 12);
        assert_eq!(CronExpr::parse("10/20 * * * *").unwrap().minutes, 1 << 10 | 1 << 30 | 1 << 50);
        assert_eq!(CronExpr::parse("1-10/3 * * * *").unwrap().minutes, 1 << 1 | 1 << 4 | 1 << 7 | 1 << 10);
        assert_eq!(CronExpr::parse("@hourly").unwrap(), CronExpr::parse("0 * * * *").unwrap());
        assert_eq!(CronExpr::parse("@daily").unwrap(), CronExpr::parse("0 0 * * *").unwrap());
    }

    #[test]
    fn rejects_bad_expressions() {
        for (expr, why) in [
            ("* * * *", "has 4 fields"),
            ("* * * * * *", "has 6 fields"),
            ("60 * * * *", "minute field \"60\": 60 is out of range (0-59)"),
            ("* 24 * * *", "hour field"),
            ("* * 0 * *", "day-of-month field"),
            ("* * * 13 *", "month field"),
            ("* * * * 8", "day-of-week field"),
            ("*/0 * * * *", "step 0"),
            ("5-1 * * * *", "backwards"),
            ("a * * * *", "is not a number"),
            ("1,,2 * * * *", "empty list item"),
            ("* * * foo *", "month field"),
        ] {
            let err = CronExpr::parse(expr).unwrap_err();
            assert!(err.contains(why), "{expr}: {err}");
        }
    }

    #[test]
    fn next_times() {
        assert_eq!(next("*/5 * * * *", "UTC", "2026-03-01T10:02:30Z"), "2026-03-01T10:05:00+00:00");
        assert_eq!(next("*/5 * * * *", "UTC", "2026-03-01T10:05:00Z"), "2026-03-01T10:10:00+00:00");
        assert_eq!(next("0 9 * * 1", "UTC", "2026-03-01T10:00:00Z"), "2026-03-02T09:00:00+00:00");
        assert_eq!(next("0 0 1 * *", "UTC", "2026-12-15T00:00:00Z"), "2027-01-01T00:00:00+00:00");
        // Either day field matches when both are restricted: the 13th, or a Friday.
        assert_eq!(next("0 0 13 * 5", "UTC", "2026-03-01T00:00:00Z"), "2026-03-06T00:00:00+00:00");
        // A leap day.
        assert_eq!(next("0 0 29 2 *", "UTC", "2026-03-01T00:00:00Z"), "2028-02-29T00:00:00+00:00");
        // Never.
        let never = CronExpr::parse("0 0 31 2 *").unwrap();
        assert!(never.next_after(Tz::UTC, at("2026-01-01T00:00:00Z")).is_none());
        // A zone's wall clock: 9:00 in Paris is 8:00 UTC in winter, 7:00 in summer.
        assert_eq!(next("0 9 * * *", "Europe/Paris", "2026-01-10T12:00:00Z"), "2026-01-11T08:00:00+00:00");
        assert_eq!(next("0 9 * * *", "Europe/Paris", "2026-07-10T12:00:00Z"), "2026-07-11T07:00:00+00:00");
    }

    #[test]
    fn spring_forward_fires_once_at_the_end_of_the_gap() {
        // Paris, 2026-03-29: 02:00 CET becomes 03:00 CEST (01:00 UTC); 02:30 does not exist.
        assert_eq!(next("30 2 * * *", "Europe/Paris", "2026-03-28T12:00:00Z"), "2026-03-29T01:00:00+00:00");
        // Every 15 minutes: 01:45 CET, then the gap's slots coalesce at 03:00 CEST, then 03:15.
        assert_eq!(next("*/15 * * * *", "Europe/Paris", "2026-03-29T00:30:00Z"), "2026-03-29T00:45:00+00:00");
        assert_eq!(next("*/15 * * * *", "Europe/Paris", "2026-03-29T00:45:00Z"), "2026-03-29T01:00:00+00:00");
        assert_eq!(next("*/15 * * * *", "Europe/Paris", "2026-03-29T01:00:00Z"), "2026-03-29T01:15:00+00:00");
        // The next day is back to normal (02:30 CEST = 00:30 UTC).
        assert_eq!(next("30 2 * * *", "Europe/Paris", "2026-03-29T01:00:00Z"), "2026-03-30T00:30:00+00:00");
    }

    #[test]
    fn fall_back_fires_once_at_the_first_occurrence() {
        // Paris, 2026-10-25: 03:00 CEST becomes 02:00 CET (01:00 UTC); 02:30 happens twice,
        // at 00:30 UTC and 01:30 UTC. It fires at the first only.
        assert_eq!(next("30 2 * * *", "Europe/Paris", "2026-10-24T12:00:00Z"), "2026-10-25T00:30:00+00:00");
        assert_eq!(next("30 2 * * *", "Europe/Paris", "2026-10-25T00:30:00Z"), "2026-10-26T01:30:00+00:00");
        // An hourly job does not run twice in the repeated hour.
        assert_eq!(next("0 * * * *", "Europe/Paris", "2026-10-25T00:00:00Z"), "2026-10-25T02:00:00+00:00");
    }

    #[test]
    fn zones() {
        assert!(timezone("Europe/Paris").is_ok());
        assert!(timezone("UTC").is_ok());
        assert!(timezone("Mars/Olympus").unwrap_err().contains("unknown time zone"));
        assert_eq!(ts(utc(1_700_000_000.5).unwrap()), 1_700_000_000.5);
    }
}
