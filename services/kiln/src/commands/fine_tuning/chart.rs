//! Text charts for the terminal: a loss curve as a sparkline of block characters, and a
//! progress bar. Pure functions of their numbers.

/// The blocks of a sparkline, from the lowest value to the highest.
const BLOCKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// The block of a constant series: a flat line halfway up.
const FLAT: char = BLOCKS[3];

/// The most columns a loss curve takes.
pub(super) const CURVE_COLUMNS: usize = 60;

/// The mean of the finite values of `values` (NaN when there is none).
fn finite_mean(values: &[f32]) -> f32 {
    let (sum, count) = values
        .iter()
        .filter(|v| v.is_finite())
        .fold((0.0_f64, 0_u32), |(sum, count), v| {
            (sum + f64::from(*v), count + 1)
        });
    if count == 0 {
        f32::NAN
    } else {
        (sum / f64::from(count)) as f32
    }
}

/// `values` in at most `columns` columns: consecutive buckets of (nearly) equal size, each
/// the mean of its finite values (NaN when it has none). A series that fits is kept as is.
pub(super) fn downsample(values: &[f32], columns: usize) -> Vec<f32> {
    let n = values.len();
    if n <= columns {
        return values.to_vec();
    }
    // n > columns: every bucket holds at least one value.
    (0..columns)
        .map(|i| finite_mean(&values[i * n / columns..(i + 1) * n / columns]))
        .collect()
}

/// The smallest and largest finite values, if any.
fn finite_range(values: &[f32]) -> Option<(f32, f32)> {
    values
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(None, |range, v| match range {
            None => Some((v, v)),
            Some((min, max)) => Some((min.min(v), max.max(v))),
        })
}

/// One block per value, from ▁ (the smallest) to █ (the largest); a constant series is a
/// flat line of ▄, a value that is not finite a space.
pub(super) fn sparkline(values: &[f32]) -> String {
    let range = finite_range(values);
    values
        .iter()
        .map(|&v| match range {
            Some((min, max)) if v.is_finite() => {
                // In f64: max - min may not fit an f32.
                let span = f64::from(max) - f64::from(min);
                if span > 0.0 {
                    let level = ((f64::from(v) - f64::from(min)) / span * 7.0).round() as usize;
                    BLOCKS[level.min(7)]
                } else {
                    FLAT
                }
            }
            _ => ' ',
        })
        .collect()
}

/// A loss value as the CLI shows it.
pub(super) fn loss_text(loss: f32) -> String {
    format!("{loss:.4}")
}

/// A loss curve on one line: the sparkline of `values` (at most [`CURVE_COLUMNS`] wide),
/// then its first, last, smallest and largest values and the number of values; `None` when
/// there is no value.
pub(super) fn loss_curve(values: &[f32]) -> Option<String> {
    let (first, last) = (values.first()?, values.last()?);
    let line = sparkline(&downsample(values, CURVE_COLUMNS));
    let (min, max) = match finite_range(values) {
        Some((min, max)) => (loss_text(min), loss_text(max)),
        None => ("-".to_owned(), "-".to_owned()),
    };
    let count = values.len();
    let steps = if count == 1 { "step" } else { "steps" };
    Some(format!(
        "{line}  first {}  last {}  min {min}  max {max}  ({count} {steps})",
        loss_text(*first),
        loss_text(*last),
    ))
}

/// A bar `width` blocks wide, filled to `percent` (clamped to 0..=100): `██████░░░░`.
pub(super) fn progress_bar(percent: i32, width: usize) -> String {
    let percent = percent.clamp(0, 100) as usize;
    let filled = percent * width / 100;
    format!("{}{}", "█".repeat(filled), "░".repeat(width - filled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparkline_spans_the_blocks_from_lowest_to_highest() {
        assert_eq!(sparkline(&[4.0, 3.0, 2.0, 1.0]), "█▆▃▁");
        assert_eq!(sparkline(&[1.0, 2.0, 3.0, 4.0]), "▁▃▆█");
        let ramp: Vec<f32> = (0..8).map(|i| i as f32).collect();
        assert_eq!(sparkline(&ramp), "▁▂▃▄▅▆▇█");
        // Negative and huge values scale the same way.
        assert_eq!(sparkline(&[-1.0, 0.0, 1.0]), "▁▅█");
        assert_eq!(sparkline(&[f32::MIN, f32::MAX]), "▁█");
    }

    #[test]
    fn a_constant_series_is_a_flat_line() {
        assert_eq!(sparkline(&[2.5; 5]), "▄▄▄▄▄");
        assert_eq!(sparkline(&[0.0]), "▄");
        assert_eq!(
            loss_curve(&[0.5; 3]).unwrap(),
            "▄▄▄  first 0.5000  last 0.5000  min 0.5000  max 0.5000  (3 steps)"
        );
    }

    #[test]
    fn values_that_are_not_finite_are_gaps() {
        assert_eq!(sparkline(&[3.0, f32::NAN, 1.0, f32::INFINITY]), "█ ▁ ");
        assert_eq!(sparkline(&[f32::NAN, f32::NAN]), "  ");
        assert_eq!(sparkline(&[]), "");
        assert_eq!(loss_curve(&[]), None);
        assert_eq!(
            loss_curve(&[f32::NAN]).unwrap(),
            "   first NaN  last NaN  min -  max -  (1 step)"
        );
        // A bucket's mean skips its NaN; a bucket of only NaN is NaN.
        assert_eq!(downsample(&[1.0, f32::NAN, 3.0, 5.0], 2), [1.0, 4.0]);
        let all_nan = downsample(&[f32::NAN; 4], 2);
        assert_eq!(all_nan.len(), 2);
        assert!(all_nan.iter().all(|v| v.is_nan()));
    }

    #[test]
    fn downsampling_averages_buckets_into_at_most_the_columns() {
        // Short series are kept as they are.
        assert_eq!(downsample(&[3.0, 1.0], 60), [3.0, 1.0]);
        assert_eq!(
            downsample(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3),
            [1.5, 3.5, 5.5]
        );
        // 7 values in 3 columns: buckets of 2, 2 and 3.
        assert_eq!(
            downsample(&[1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 6.0], 3),
            [1.0, 2.0, 4.0]
        );
        assert!(downsample(&[1.0, 2.0], 0).is_empty());
    }

    #[test]
    fn a_long_decreasing_curve_keeps_its_trend_in_sixty_columns() {
        // 1000 steps of a falling loss with noise on every other step.
        let losses: Vec<f32> = (0..1000)
            .map(|i| 3.0 - i as f32 * 0.0025 + if i % 2 == 0 { 0.05 } else { -0.05 })
            .collect();
        let columns = downsample(&losses, CURVE_COLUMNS);
        assert_eq!(columns.len(), CURVE_COLUMNS);
        assert!(columns.windows(2).all(|w| w[0] > w[1]), "{columns:?}");
        // The first and last buckets: steps 0..16 and 983..1000.
        assert!(
            (columns[0] - (3.0 - 7.5 * 0.0025)).abs() < 1e-4,
            "{}",
            columns[0]
        );
        assert!((columns[59] - (3.0 - 991.0 * 0.0025 - 0.05 / 17.0)).abs() < 1e-4);
        let line = sparkline(&columns);
        assert_eq!(line.chars().count(), CURVE_COLUMNS);
        assert!(line.starts_with('█') && line.ends_with('▁'), "{line}");
        let curve = loss_curve(&losses).unwrap();
        let (spark, stats) = curve.split_once("  ").unwrap();
        assert_eq!(spark, line);
        assert_eq!(
            stats,
            "first 3.0500  last 0.4525  min 0.4525  max 3.0500  (1000 steps)"
        );
    }

    #[test]
    fn progress_bars_fill_to_the_percent() {
        assert_eq!(progress_bar(0, 10), "░░░░░░░░░░");
        assert_eq!(progress_bar(45, 10), "████░░░░░░");
        assert_eq!(progress_bar(50, 20), "██████████░░░░░░░░░░");
        assert_eq!(progress_bar(100, 10), "██████████");
        assert_eq!(progress_bar(250, 4), "████");
        assert_eq!(progress_bar(-3, 4), "░░░░");
    }
}
