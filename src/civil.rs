//! UTC calendar fields of a Unix time, std only: shared by the library
//! (conflict names) and both binaries' printing (`view.rs`).

/// (year, month, day, hour, minute, second) in UTC of `secs` since the
/// epoch (Howard Hinnant's days-from-civil, inverted).
pub fn civil(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_dates() {
        assert_eq!(super::civil(0), (1970, 1, 1, 0, 0, 0));
        // 2026-12-06 23:22:21 UTC
        assert_eq!(super::civil(1_796_599_341), (2026, 12, 6, 23, 22, 21));
        // 2000-02-29 12:00:00 UTC, a leap day
        assert_eq!(super::civil(951_825_600), (2000, 2, 29, 12, 0, 0));
        assert_eq!(super::civil(-1), (1969, 12, 31, 23, 59, 59));
    }
}
