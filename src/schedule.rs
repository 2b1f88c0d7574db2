//! Backup schedules: parsing the cron expression of a `[[source]]`, finding the slot a moment
//! falls in, and naming snapshots after their slot.
//!
//! This module owns the meaning of a schedule string and of a snapshot id. It is pure: no I/O,
//! no clock (callers pass the time), no sleeping; the daemon's scheduler loop lives elsewhere
//! and asks this module when the next slot starts and which slot "now" belongs to.
//!
//! Accepted expressions, all in UTC:
//! - 5 fields, classic cron: `minute hour day-of-month month day-of-week` (`0 * * * *`). The
//!   slot starts at second 0.
//! - 6 fields, the same with seconds first (`*/5 * * * * *`).
//! - `@hourly`, `@daily` (`@midnight`), `@weekly` (Sunday 00:00), `@monthly`, `@yearly`
//!   (`@annually`).
//!
//! Day of week uses classic cron numbering in both forms: 0 or 7 = Sunday, 1 = Monday …
//! 6 = Saturday, and names `SUN`…`SAT` (case-insensitive, full names too), with lists, ranges
//! (`MON-FRI`, `1-5`, `FRI-SUN`, `5-7`) and steps (`*/2`, `1-5/2`). The `cron` crate underneath
//! numbers days 1 = Sunday … 7 = Saturday, so this module rewrites the day-of-week field into
//! day names before handing it over; a number never reaches the crate. Quartz users beware:
//! `1` is Monday here, as in crontab(5), not Sunday.
//!
//! Classic cron runs a job when either day-of-month or day-of-week matches if both are
//! restricted; the `cron` crate requires both. Rather than silently differ, an expression that
//! restricts both (neither is `*` or `?`) is rejected.
//!
//! A slot is the interval from one fire time to the next; [`Schedule::slot_at_or_before`]
//! gives the start of the slot containing a moment (its latest fire time at or before it).
//! It searches backwards with the crate's reverse iteration, which walks the field values
//! (years, months, days, …) rather than every second, so even a schedule that fires once a
//! year or only on 29 February is answered without a scan; the crate covers the years 1970 to
//! 2100, and outside them there is no slot (`None`).

use std::str::FromStr;

use chrono::{DateTime, NaiveDateTime, SubsecRound, Utc};

/// The format of a snapshot id: the UTC start of its slot, `20261127T140000Z`.
pub const SNAPSHOT_ID_FORMAT: &str = "%Y%m%dT%H%M%SZ";

/// Fire times looked at to find a schedule's shortest slot: 41 days of an hourly schedule,
/// 2.7 years of a daily one, 19 of a weekly one (every irregular gap recurs well within);
/// cheap, the crate steps field by field.
const SLOT_SAMPLE: usize = 1000;

/// What a schedule may look like, appended to messages about its shape.
const EXPECTED_FORMS: &str = "expected 5 fields `minute hour day-of-month month day-of-week` \
     (e.g. \"0 * * * *\"), 6 fields with seconds first (e.g. \"*/5 * * * * *\"), \
     or one of @hourly, @daily, @weekly, @monthly, @yearly";

/// Day names for classic cron day numbers 0 (Sunday) to 6 (Saturday); the `cron` crate
/// understands them unambiguously.
const DAY_NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// A schedule expression that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The expression is malformed, or is well-formed but unusable.
    #[error("invalid schedule \"{expr}\": {reason}")]
    Invalid {
        /// The expression as written in the config.
        expr: String,
        /// What is wrong with it and, for malformed ones, the accepted forms.
        reason: String,
    },
}

/// A parsed backup schedule, in UTC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// The expression as written (trimmed), for messages and `config check`.
    expr: String,
    inner: cron::Schedule,
}

impl Schedule {
    /// Parses a schedule expression (see the module docs for the accepted forms).
    pub fn parse(expr: &str) -> Result<Schedule, ScheduleError> {
        let expr = expr.trim();
        let invalid = |reason: String| ScheduleError::Invalid {
            expr: expr.to_string(),
            reason,
        };
        let crate_expr = if expr.starts_with('@') {
            shorthand(expr)
                .ok_or_else(|| invalid(format!("unknown shorthand; {EXPECTED_FORMS}")))?
        } else {
            let fields: Vec<&str> = expr.split_whitespace().collect();
            let (seconds, rest) = match fields.len() {
                5 => ("0", &fields[..]),
                6 => (fields[0], &fields[1..]),
                n => return Err(invalid(format!("it has {n} fields; {EXPECTED_FORMS}"))),
            };
            let &[minutes, hours, day_of_month, month, day_of_week] = rest else {
                return Err(invalid(format!(
                    "it has {} fields; {EXPECTED_FORMS}",
                    fields.len()
                )));
            };
            if is_restricted(day_of_month) && is_restricted(day_of_week) {
                return Err(invalid(
                    "it restricts both day-of-month and day-of-week; classic cron fires when \
                     either matches but pgferry's engine only when both do, so restrict one and \
                     set the other to `*`"
                        .to_string(),
                ));
            }
            let day_of_week = day_of_week_as_names(day_of_week).map_err(invalid)?;
            format!("{seconds} {minutes} {hours} {day_of_month} {month} {day_of_week}")
        };
        let inner = cron::Schedule::from_str(&crate_expr)
            .map_err(|e| invalid(format!("{}; {EXPECTED_FORMS}", crate_message(&e))))?;
        if inner.after(&DateTime::UNIX_EPOCH).next().is_none() {
            return Err(invalid(
                "it never fires (a date that does not exist, such as 30 February)".to_string(),
            ));
        }
        Ok(Schedule {
            expr: expr.to_string(),
            inner,
        })
    }

    /// The start of the slot containing `t`: the latest fire time at or before `t`. `None` if
    /// the schedule never fired at or before `t` within the years 1970 to 2100.
    pub fn slot_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Fire times are whole seconds; the crate's reverse step from a whole second is
        // strictly before it, so check the second itself first.
        let second = t.trunc_subsecs(0);
        if self.inner.includes(second) {
            return Some(second);
        }
        self.inner.after(&second).next_back()
    }

    /// The first fire time strictly after `t`, `None` past the year 2100.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.inner.after(&t).next()
    }

    /// The shortest slot of the schedule: the smallest gap between consecutive fire times
    /// among the first [`SLOT_SAMPLE`] after 2000-01-01 (enough to see every irregular gap of
    /// a cron expression: hours of a day, days of a month, February of a leap year). `None`
    /// if it fires fewer than twice.
    pub fn shortest_slot(&self) -> Option<std::time::Duration> {
        let start = DateTime::from_timestamp(946_684_800, 0)?; // 2000-01-01T00:00:00Z
        let fires: Vec<DateTime<Utc>> = self.inner.after(&start).take(SLOT_SAMPLE).collect();
        fires
            .windows(2)
            .filter_map(|w| (w[1] - w[0]).to_std().ok())
            .min()
    }

    /// The expression as written in the config (trimmed).
    pub fn expr(&self) -> &str {
        &self.expr
    }
}

/// The snapshot id of the slot starting at `t`, `20261127T140000Z` (sub-seconds dropped).
pub fn snapshot_id(t: DateTime<Utc>) -> String {
    t.format(SNAPSHOT_ID_FORMAT).to_string()
}

/// The time a snapshot id names, or `None` if `id` is not exactly in the form
/// [`snapshot_id`] writes (so an object key that merely looks similar is not taken for one).
pub fn parse_snapshot_id(id: &str) -> Option<DateTime<Utc>> {
    if id.len() != 16 {
        return None;
    }
    let time = NaiveDateTime::parse_from_str(id, SNAPSHOT_ID_FORMAT)
        .ok()?
        .and_utc();
    (snapshot_id(time) == id).then_some(time)
}

/// The human part of a `cron` crate parse error. Its message echoes the expression the crate
/// saw (with the seconds we may have added) and a caret line before the explanation on the
/// last line; only the explanation means anything to the operator.
fn crate_message(error: &cron::error::Error) -> String {
    let message = error.to_string();
    let last = message
        .lines()
        .rev()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or("not a cron expression");
    inclusive_bound(last)
}

/// The `cron` crate says "Minutes must be less than 59. ('61' specified.)" where its bound is
/// inclusive (59 is allowed): say "at most 59 (61 given)" instead.
fn inclusive_bound(message: &str) -> String {
    let Some((field, rest)) = message.split_once(" must be less than ") else {
        return message.to_string();
    };
    let max = rest
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap_or(rest);
    match rest
        .split_once("('")
        .and_then(|(_, given)| given.split_once('\''))
    {
        Some((given, _)) => format!("{field} must be at most {max} ({given} given)"),
        None => format!("{field} must be at most {max}"),
    }
}

/// The `cron` crate's spelling of a supported `@` shorthand.
fn shorthand(expr: &str) -> Option<String> {
    let canonical = match expr {
        "@hourly" | "@daily" | "@weekly" | "@monthly" | "@yearly" => expr,
        "@midnight" => "@daily",
        "@annually" => "@yearly",
        _ => return None,
    };
    Some(canonical.to_string())
}

/// Whether a day-of-month or day-of-week field restricts the days (anything but `*` or `?`).
fn is_restricted(field: &str) -> bool {
    field != "*" && field != "?"
}

/// Rewrites a classic day-of-week field (0 or 7 = Sunday) as a list of day names for the
/// `cron` crate (which numbers 1 = Sunday), or `*` when it covers every day.
fn day_of_week_as_names(field: &str) -> Result<String, String> {
    let mut days = [false; 7];
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => match step.parse::<usize>() {
                Ok(step) if step > 0 => (range, Some(step)),
                _ => {
                    return Err(format!(
                        "day-of-week step {step:?} is not a positive number"
                    ))
                }
            },
            None => (item, None),
        };
        let (start, end) = if range == "*" || range == "?" {
            (0, 6)
        } else if let Some((first, last)) = range.split_once('-') {
            let first = day_number(first)?;
            let mut last = day_number(last)?;
            if last == 0 && first > 0 {
                // `FRI-SUN`, `5-0`: Sunday closes the week.
                last = 7;
            }
            if first > last {
                return Err(format!(
                    "day-of-week range {range:?} runs backwards; split it, e.g. `5-7,1` or \
                     `FRI-SUN,MON`"
                ));
            }
            (first, last)
        } else {
            let day = day_number(range)?;
            // `N/S` means from N to the end of the week, as in cronie.
            (day, if step.is_some() { 7 } else { day })
        };
        for day in (start..=end).step_by(step.unwrap_or(1)) {
            days[day % 7] = true;
        }
    }
    if days.iter().all(|&d| d) {
        return Ok("*".to_string());
    }
    let names: Vec<&str> = DAY_NAMES
        .iter()
        .zip(days)
        .filter_map(|(name, on)| on.then_some(*name))
        .collect();
    Ok(names.join(","))
}

/// A classic cron day number (0 or 7 = Sunday … 6 = Saturday) from a number or a day name.
fn day_number(token: &str) -> Result<usize, String> {
    if !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit()) {
        return match token.parse::<usize>() {
            Ok(day) if day <= 7 => Ok(day),
            _ => Err(format!(
                "day of week {token} is out of range: use 0-7 (0 and 7 = Sunday) or SUN-SAT"
            )),
        };
    }
    let day = match token.to_ascii_lowercase().as_str() {
        "sun" | "sunday" => 0,
        "mon" | "monday" => 1,
        "tue" | "tues" | "tuesday" => 2,
        "wed" | "wednesday" => 3,
        "thu" | "thurs" | "thursday" => 4,
        "fri" | "friday" => 5,
        "sat" | "saturday" => 6,
        _ => {
            return Err(format!(
                "{token:?} is not a day of week: use 0-7 (0 and 7 = Sunday) or SUN-SAT"
            ))
        }
    };
    Ok(day)
}

#[cfg(test)]
mod tests {
    use chrono::{Datelike, TimeDelta, TimeZone, Timelike, Weekday};

    use super::*;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
            .single()
            .expect("valid test date")
    }

    fn parse(expr: &str) -> Schedule {
        Schedule::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"))
    }

    fn reason(expr: &str) -> String {
        match Schedule::parse(expr) {
            Ok(_) => panic!("{expr:?} was accepted"),
            Err(ScheduleError::Invalid {
                expr: named,
                reason,
            }) => {
                assert_eq!(named, expr.trim());
                reason
            }
        }
    }

    /// The weekdays a schedule fires on in the week starting Sunday 2026-11-01 00:00.
    fn fire_days(expr: &str) -> Vec<Weekday> {
        let schedule = parse(expr);
        let start = at(2026, 11, 1, 0, 0, 0); // a Sunday
        let first = schedule.next_after(start - TimeDelta::seconds(1));
        let mut days: Vec<Weekday> = std::iter::successors(first, |t| schedule.next_after(*t))
            .take_while(|t| *t < start + TimeDelta::days(7))
            .map(|t| t.weekday())
            .collect();
        days.dedup();
        days
    }

    #[test]
    fn hourly_five_fields() {
        let s = parse("0 * * * *");
        assert_eq!(s.expr(), "0 * * * *");
        let t = at(2026, 11, 27, 14, 37, 12);
        assert_eq!(s.slot_at_or_before(t), Some(at(2026, 11, 27, 14, 0, 0)));
        assert_eq!(s.next_after(t), Some(at(2026, 11, 27, 15, 0, 0)));
        // Across midnight and a month end.
        let t = at(2026, 11, 30, 23, 59, 59);
        assert_eq!(s.next_after(t), Some(at(2026, 12, 1, 0, 0, 0)));
        assert_eq!(s.slot_at_or_before(t), Some(at(2026, 11, 30, 23, 0, 0)));
    }

    #[test]
    fn every_five_seconds_six_fields() {
        let s = parse("*/5 * * * * *");
        let t = at(2026, 11, 27, 14, 0, 7);
        assert_eq!(s.slot_at_or_before(t), Some(at(2026, 11, 27, 14, 0, 5)));
        assert_eq!(s.next_after(t), Some(at(2026, 11, 27, 14, 0, 10)));
        let t = at(2026, 11, 27, 14, 59, 58);
        assert_eq!(s.next_after(t), Some(at(2026, 11, 27, 15, 0, 0)));
    }

    #[test]
    fn daily_at_half_past_two() {
        let s = parse("30 2 * * *");
        let t = at(2026, 3, 1, 1, 0, 0);
        assert_eq!(s.slot_at_or_before(t), Some(at(2026, 2, 28, 2, 30, 0)));
        assert_eq!(s.next_after(t), Some(at(2026, 3, 1, 2, 30, 0)));
        let t = at(2026, 3, 1, 2, 30, 1);
        assert_eq!(s.slot_at_or_before(t), Some(at(2026, 3, 1, 2, 30, 0)));
        assert_eq!(s.next_after(t), Some(at(2026, 3, 2, 2, 30, 0)));
    }

    #[test]
    fn slot_boundaries_at_the_fire_time() {
        let s = parse("0 * * * *");
        let fire = at(2026, 11, 27, 14, 0, 0);
        // At the fire time the slot starts there; just before, it is the previous one.
        assert_eq!(s.slot_at_or_before(fire), Some(fire));
        assert_eq!(
            s.slot_at_or_before(fire - TimeDelta::nanoseconds(1)),
            Some(at(2026, 11, 27, 13, 0, 0))
        );
        assert_eq!(
            s.slot_at_or_before(fire + TimeDelta::milliseconds(999)),
            Some(fire)
        );
        // next_after is strictly after, even from the fire time itself.
        assert_eq!(s.next_after(fire), Some(at(2026, 11, 27, 15, 0, 0)));
        assert_eq!(s.next_after(fire - TimeDelta::nanoseconds(1)), Some(fire));
        assert_eq!(
            s.next_after(fire + TimeDelta::milliseconds(500)),
            Some(at(2026, 11, 27, 15, 0, 0))
        );
    }

    #[test]
    fn weekly_on_monday_numeric_and_named() {
        for expr in ["0 3 * * 1", "0 3 * * MON", "0 3 * * mon", "0 3 * * Monday"] {
            let s = parse(expr);
            // 2026-11-27 is a Friday: the slot is Monday 2026-11-23 03:00.
            let t = at(2026, 11, 27, 12, 0, 0);
            assert_eq!(
                s.slot_at_or_before(t),
                Some(at(2026, 11, 23, 3, 0, 0)),
                "{expr}"
            );
            assert_eq!(s.next_after(t), Some(at(2026, 11, 30, 3, 0, 0)), "{expr}");
        }
        let s = parse("0 0 3 * * 1"); // 6 fields: same numbering
        assert_eq!(
            s.next_after(at(2026, 11, 27, 12, 0, 0)),
            Some(at(2026, 11, 30, 3, 0, 0))
        );
    }

    #[test]
    fn day_of_week_uses_classic_cron_numbering() {
        use Weekday::*;
        assert_eq!(fire_days("0 3 * * 0"), [Sun]);
        assert_eq!(fire_days("0 3 * * 7"), [Sun]);
        assert_eq!(fire_days("0 3 * * SUN"), [Sun]);
        assert_eq!(fire_days("0 3 * * 6"), [Sat]);
        assert_eq!(fire_days("0 3 * * 1-5"), [Mon, Tue, Wed, Thu, Fri]);
        assert_eq!(fire_days("0 3 * * MON-FRI"), [Mon, Tue, Wed, Thu, Fri]);
        assert_eq!(fire_days("0 3 * * 5-7"), [Sun, Fri, Sat]);
        assert_eq!(fire_days("0 3 * * FRI-SUN"), [Sun, Fri, Sat]);
        assert_eq!(fire_days("0 3 * * SAT,SUN"), [Sun, Sat]);
        assert_eq!(fire_days("0 3 * * 1,3,5"), [Mon, Wed, Fri]);
        assert_eq!(fire_days("0 3 * * 1-5/2"), [Mon, Wed, Fri]);
        assert_eq!(fire_days("0 3 * * */2"), [Sun, Tue, Thu, Sat]);
        assert_eq!(fire_days("0 3 * * 1/2"), [Sun, Mon, Wed, Fri]);
        assert_eq!(
            fire_days("0 3 * * 0-7"),
            [Sun, Mon, Tue, Wed, Thu, Fri, Sat]
        );
        assert_eq!(fire_days("0 3 * * ?"), [Sun, Mon, Tue, Wed, Thu, Fri, Sat]);
        assert_eq!(fire_days("@weekly"), [Sun]);
    }

    #[test]
    fn shorthands() {
        let t = at(2026, 11, 27, 14, 37, 0);
        assert_eq!(
            parse("@hourly").slot_at_or_before(t),
            Some(at(2026, 11, 27, 14, 0, 0))
        );
        assert_eq!(
            parse("@midnight").slot_at_or_before(t),
            Some(at(2026, 11, 27, 0, 0, 0))
        );
        assert_eq!(
            parse("@monthly").slot_at_or_before(t),
            Some(at(2026, 11, 1, 0, 0, 0))
        );
        assert_eq!(
            parse("@annually").slot_at_or_before(t),
            Some(at(2026, 1, 1, 0, 0, 0))
        );
    }

    #[test]
    fn yearly_and_leap_day_slots_are_found_far_back() {
        let yearly = parse("0 0 1 1 *");
        let t = at(2026, 12, 31, 23, 59, 59);
        assert_eq!(yearly.slot_at_or_before(t), Some(at(2026, 1, 1, 0, 0, 0)));
        assert_eq!(yearly.next_after(t), Some(at(2027, 1, 1, 0, 0, 0)));

        let leap_day = parse("0 12 29 2 *");
        let t = at(2027, 6, 1, 0, 0, 0);
        assert_eq!(
            leap_day.slot_at_or_before(t),
            Some(at(2024, 2, 29, 12, 0, 0))
        );
        assert_eq!(leap_day.next_after(t), Some(at(2028, 2, 29, 12, 0, 0)));
        // 2100 is not a leap year, and the crate stops at 2100.
        assert_eq!(leap_day.next_after(at(2096, 3, 1, 0, 0, 0)), None);
    }

    #[test]
    fn no_slot_outside_the_supported_years() {
        let s = parse("0 * * * *");
        assert_eq!(s.slot_at_or_before(at(1969, 12, 31, 23, 59, 0)), None);
        assert_eq!(s.next_after(at(2100, 12, 31, 23, 0, 0)), None);
    }

    #[test]
    fn slots_agree_with_forward_iteration() {
        // For assorted schedules and moments, the slot is a fire time at or before t and the
        // next fire time after the slot is after t: no fire time lies in between.
        let exprs = [
            "0 * * * *",
            "*/5 * * * * *",
            "30 2 * * *",
            "0 3 * * 1",
            "15 4 * * 5-7",
            "0 0 1 * *",
            "0 6 1-7 * *",
            "7 */6 * * *",
            "0 0 1 1 *",
        ];
        let mut state: u64 = 0x1234_5678;
        for expr in exprs {
            let s = parse(expr);
            for _ in 0..200 {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let offset = i64::try_from((state >> 33) % (3 * 366 * 24 * 3600)).expect("fits");
                let t = at(2025, 1, 1, 0, 0, 0)
                    + TimeDelta::seconds(offset)
                    + TimeDelta::milliseconds(i64::try_from(state % 1000).expect("fits"));
                let slot = s.slot_at_or_before(t).expect("a slot");
                assert!(slot <= t, "{expr} {t}: {slot}");
                assert_eq!(slot.nanosecond(), 0);
                let next = s.next_after(slot).expect("a next fire time");
                assert!(next > t, "{expr} {t}: slot {slot}, next {next}");
                assert_eq!(s.next_after(t), Some(next), "{expr} {t}");
            }
        }
    }

    #[test]
    fn invalid_expressions_are_rejected_with_the_expected_forms() {
        let four = reason("0 * * *");
        assert!(four.contains("4 fields"), "{four}");
        assert!(four.contains("expected 5 fields"), "{four}");
        assert!(reason("0 0 * * * * 2026").contains("7 fields"));
        assert!(reason("").contains("0 fields"));
        assert!(reason("every hour please").contains("3 fields"));
        let garbage = reason("a b c * *");
        assert!(garbage.contains("expected 5 fields"), "{garbage}");
        assert!(!garbage.contains('\n'), "{garbage}");
        assert!(!garbage.contains("0 a b c"), "{garbage}");
        assert!(reason("61 * * * * *").contains("expected 5 fields"));
        assert!(reason("60 * * * *").contains("expected 5 fields"));
        assert!(reason("0 24 * * *").contains("expected 5 fields"));
        // The crate's bounds are inclusive; its "less than 59" was wrong.
        let minutes = reason("61 * * * *");
        assert!(
            minutes.contains("Minutes must be at most 59 (61 given)"),
            "{minutes}"
        );
        assert!(!minutes.contains("less than"), "{minutes}");
        let hours = reason("0 25 * * *");
        assert!(
            hours.contains("Hours must be at most 23 (25 given)"),
            "{hours}"
        );
        assert!(reason("@fortnightly").contains("unknown shorthand"));
        assert!(reason("0 3 * * 8").contains("out of range"));
        assert!(reason("0 3 * * FUNDAY").contains("not a day of week"));
        assert!(reason("0 3 * * 5-1").contains("runs backwards"));
        assert!(reason("0 3 * * */0").contains("step"));
        assert!(reason("0 3 * * MON,").contains("not a day of week"));
        assert!(reason("0 3 * * 5L").contains("not a day of week"));
        assert!(reason("0 3 1 * MON").contains("both day-of-month and day-of-week"));
        assert!(reason("0 0 30 2 *").contains("never fires"));
    }

    #[test]
    fn error_message_names_the_expression() {
        let err = Schedule::parse(" 0 * * * ").expect_err("4 fields");
        let message = err.to_string();
        assert!(
            message.starts_with("invalid schedule \"0 * * *\": it has 4 fields"),
            "{message}"
        );
    }

    #[test]
    fn snapshot_id_round_trip() {
        let t = at(2026, 11, 27, 14, 0, 0);
        assert_eq!(snapshot_id(t), "20261127T140000Z");
        assert_eq!(parse_snapshot_id("20261127T140000Z"), Some(t));
        let odd = at(2024, 2, 29, 23, 59, 59);
        assert_eq!(parse_snapshot_id(&snapshot_id(odd)), Some(odd));
        // Sub-seconds are dropped.
        assert_eq!(
            snapshot_id(t + TimeDelta::milliseconds(900)),
            "20261127T140000Z"
        );
    }

    #[test]
    fn malformed_snapshot_ids_are_rejected() {
        for id in [
            "",
            "20261127T140000",
            "20261127T140000z",
            "20261127 140000Z",
            "2026-11-27T14:00:00Z",
            "20261327T140000Z",
            "20260230T140000Z",
            "20261127T246000Z",
            "+2026112T140000Z",
            "20261127T140000Z.manifest.json",
        ] {
            assert_eq!(parse_snapshot_id(id), None, "{id:?}");
        }
    }

    #[test]
    fn shortest_slot_is_the_smallest_gap_between_fires() {
        let mins = |e: &str| parse(e).shortest_slot().map(|d| d.as_secs() / 60);
        assert_eq!(mins("0 * * * *"), Some(60));
        assert_eq!(mins("@daily"), Some(24 * 60));
        // Irregular: 09:00 and 17:00 give slots of 8 h and 16 h.
        assert_eq!(mins("0 9,17 * * *"), Some(8 * 60));
        // Weekdays only: the weekend slot is longer, the shortest is a day.
        assert_eq!(mins("0 3 * * MON-FRI"), Some(24 * 60));
        // February is the shortest month.
        assert_eq!(mins("@monthly"), Some(28 * 24 * 60));
        assert_eq!(
            parse("*/10 * * * * *").shortest_slot(),
            Some(std::time::Duration::from_secs(10))
        );
    }
}
