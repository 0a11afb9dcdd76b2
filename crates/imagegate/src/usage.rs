//! `imagegate usage`: what was spent, from the usage ledger, as a table for people or CSV for
//! spreadsheets and scripts. Reads the database `serve` writes (`--database-url`, or the SQLite file
//! in `--data-dir`); the sums are the ledger's, exact to the nano-dollar. The report itself (groups,
//! names, CSV) is [`ledger::report`]'s, shared with the console's CSV download.
//!
//! Every text cell is escaped on the way out ([`printable`]): names and models come from users.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::io::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use clap::Args;
use clap::builder::{PossibleValuesParser, TypedValueParser};
pub(crate) use ledger::report::printable;
use ledger::report::{By, Report, parse_when, sum_cells};

use crate::ConfigArgs;

#[derive(Args)]
pub struct UsageArgs {
    /// Group by model, key, project, provider, day, size, operation, tier (default, flex, batch) or
    /// basis (the billing basis); several comma-separated (`model,day`); `none` for the total only.
    #[arg(long, value_parser = grouping(), value_delimiter = ',', default_value = "model", value_name = "DIMENSIONS")]
    by: Vec<Option<By>>,
    /// From: a time ago (`30d`, `12h`, `90m`, `2w`), a UTC date (`2026-11-01`) or an RFC 3339 time.
    #[arg(long, default_value = "30d", value_name = "WHEN")]
    since: String,
    /// Up to (exclusive), in the same forms; a date includes that whole day [default: now].
    #[arg(long, value_name = "WHEN")]
    until: Option<String>,
    /// Print CSV with a header row (one row per group, no total row) instead of a table.
    #[arg(long)]
    csv: bool,
    #[command(flatten)]
    config: ConfigArgs,
}

/// `--by`'s values: each [`By`] by its name, and `none` (no grouping) as `None`.
fn grouping() -> impl TypedValueParser<Value = Option<By>> {
    let names: Vec<&'static str> = By::ALL.iter().map(|b| b.as_str()).chain(["none"]).collect();
    PossibleValuesParser::new(names).map(|name| By::parse(&name))
}

pub async fn run(args: UsageArgs) -> Result<(), String> {
    let now = Utc::now();
    let start = parse_when(&args.since, now, false).map_err(|e| format!("--since {}: {e}", args.since))?;
    let end = match &args.until {
        Some(until) => Some(parse_when(until, now, true).map_err(|e| format!("--until {until}: {e}"))?),
        None => None,
    };
    if end.is_some_and(|end| end <= start) {
        return Err("--until must be later than --since".into());
    }
    let by: Vec<By> = args.by.iter().flatten().copied().collect();
    let ledger = args.config.open_ledger(ledger::LedgerOptions::default()).await?;
    let result = ledger.usage_report(&by, start, end).await.map_err(|e| e.to_string());
    ledger.close().await;
    let report = result?;
    let text = if args.csv { report.csv() } else { to_table(&report) };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).map_err(|e| e.to_string())
}

/// Column headers of one grouping field in the table (the basis is the last column, unless grouped
/// by it).
fn headers(by: By) -> &'static [&'static str] {
    match by {
        By::Model => &["MODEL"],
        By::Key => &["KEY", "KEY NAME"],
        By::Project => &["PROJECT"],
        By::Provider => &["PROVIDER"],
        By::Day => &["DAY (UTC)"],
        By::Size => &["SIZE"],
        By::Operation => &["OPERATION"],
        By::Tier => &["TIER"],
        By::Basis => &["BILLED BY"],
    }
}

/// The sums' columns; all but the last (the basis) are numbers. Tokens: input text, input image, output.
const SUM_HEADERS: [&str; 8] =
    ["REQUESTS", "SUCCEEDED", "IMAGES", "TEXT TOKENS", "IMAGE TOKENS", "OUTPUT TOKENS", "COST USD", "BILLED BY"];

fn to_table(report: &Report) -> String {
    let dims = &report.by;
    let mut headers_row: Vec<String> = Vec::new();
    for by in dims {
        headers_row.extend(headers(*by).iter().map(|h| (*h).to_owned()));
    }
    if headers_row.is_empty() {
        // Not grouped: one column, to hold the total's label.
        headers_row.push(String::new());
    }
    let group_columns = headers_row.len();
    let with_basis = !dims.contains(&By::Basis);
    let sum_headers = if with_basis { &SUM_HEADERS[..] } else { &SUM_HEADERS[..SUM_HEADERS.len() - 1] };
    headers_row.extend(sum_headers.iter().map(|h| (*h).to_owned()));
    let sums_row = |sums: &ledger::report::Sums| {
        let mut cells = sum_cells(sums, pricing::format_usd);
        if with_basis {
            cells.push(sums.basis());
        }
        cells
    };
    let mut rows = vec![headers_row];
    for (key, sums) in &report.groups {
        let mut row = Vec::new();
        for (by, value) in dims.iter().zip(key) {
            row.extend(report.label(*by, value.as_deref()));
        }
        row.extend(sums_row(sums));
        rows.push(row);
    }
    let body_end = rows.len();
    let mut total_row = vec!["TOTAL".to_owned()];
    total_row.resize(group_columns, String::new());
    total_row.extend(sums_row(&report.total));
    rows.push(total_row);
    let numeric = |i: usize| i >= group_columns && i < group_columns + SUM_HEADERS.len() - 1;

    let until = report.end.map_or_else(|| "now".to_owned(), fmt_time);
    let grouping = if dims.is_empty() {
        String::new()
    } else {
        format!(", by {}", dims.iter().map(|d| d.as_str()).collect::<Vec<_>>().join(", "))
    };
    let mut out = format!("Usage from {} to {until}{grouping}\n", fmt_time(report.start));
    out.push_str(&table(&rows, numeric, Some(body_end).filter(|end| *end > 1)));
    out.push_str(&legend(&report.total.bases));
    out
}

/// What each billing basis shown means, for the bases present.
fn legend(bases: &BTreeSet<String>) -> String {
    if bases.is_empty() {
        return String::new();
    }
    let mut out = String::from("\nBilled by:\n");
    for basis in bases {
        let meaning = match basis.as_str() {
            "tokens" => "billed by tokens: text and image input tokens, output tokens, at the model's token prices",
            "per_image" => "billed per image: a price for each image, by quality and size",
            "compute" => "billed by compute time: a local model's measured run time at the hourly price",
            "flat" => "billed a flat price per image, from the config",
            _ => "as recorded by the server",
        };
        out.push_str(&format!("  {:<10} {meaning}\n", printable(basis)));
    }
    out
}

/// Rows as aligned columns (two spaces apart), the first row a header followed by a rule, and a rule
/// before row `rule_before` (the total) when given. Columns where `right(i)` are right-aligned. Every
/// cell is shown [`printable`]: the tables hold names users chose.
pub(crate) fn table(rows: &[Vec<String>], right: impl Fn(usize) -> bool, rule_before: Option<usize>) -> String {
    let rows: Vec<Vec<Cow<'_, str>>> = rows.iter().map(|row| row.iter().map(|c| printable(c)).collect()).collect();
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; columns];
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let rule = |widths: &[usize]| {
        let line: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        format!("{}\n", line.join("  "))
    };
    let mut out = String::new();
    for (r, row) in rows.iter().enumerate() {
        if rule_before == Some(r) {
            out.push_str(&rule(&widths));
        }
        let mut line = String::new();
        for (i, width) in widths.iter().enumerate() {
            let cell = row.get(i).map_or("", |c| c.as_ref());
            if i > 0 {
                line.push_str("  ");
            }
            if right(i) {
                line.push_str(&format!("{cell:>width$}"));
            } else {
                line.push_str(&format!("{cell:<width$}"));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
        if r == 0 {
            out.push_str(&rule(&widths));
        }
    }
    out
}

/// `2026-11-01 12:00 UTC`.
pub(crate) fn fmt_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// RFC 3339 to the second, `Z` for UTC.
pub(crate) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tables_show_control_characters_as_escapes() {
        let rows = vec![vec!["NAME".to_owned(), "N".to_owned()], vec!["\u{1b}[2Jx".to_owned(), "1".to_owned()]];
        let text = table(&rows, |i| i == 1, None);
        assert!(!text.contains('\u{1b}'), "{text:?}");
        // Aligned on what is shown: the escape's ten characters.
        assert_eq!(text, "NAME        N\n----------  -\n\\u{1b}[2Jx  1\n");
    }

    #[test]
    fn table_aligns_and_rules() {
        let rows = vec![
            vec!["MODEL".to_owned(), "COST".to_owned()],
            vec!["gpt-image-1".to_owned(), "0.04".to_owned()],
            vec!["TOTAL".to_owned(), "10.04".to_owned()],
        ];
        let text = table(&rows, |i| i == 1, Some(2));
        assert_eq!(
            text,
            "MODEL         COST\n-----------  -----\ngpt-image-1   0.04\n-----------  -----\nTOTAL        10.04\n"
        );
    }
}
