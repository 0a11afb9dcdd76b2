//! `imagegate usage`: what was spent, from the usage ledger, as a table for people or CSV for
//! spreadsheets and scripts. Reads the database `serve` writes (`--database-url`, or the SQLite file
//! in `--data-dir`); the sums are the ledger's, exact to the nano-dollar.
//!
//! Names and models come from users (an admin's key names, any client's model string), so every text
//! cell is escaped on the way out: control characters shown as visible escapes ([`printable`]) in
//! tables and CSV alike, and CSV cells that a spreadsheet would run as a formula prefixed with `'`
//! ([`csv_text`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;

use chrono::{DateTime, NaiveDate, SecondsFormat, TimeDelta, Utc};
use clap::{Args, ValueEnum};
use ledger::{Decimal, Dimension, Ledger, UsageQuery, UsageRow};

use crate::ConfigArgs;

#[derive(Args)]
pub struct UsageArgs {
    /// Group by model, key, project, day, size, operation, tier (default, flex, batch) or basis (the
    /// billing basis); several
    /// comma-separated (`model,day`); `none` for the total only.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "model", value_name = "DIMENSIONS")]
    by: Vec<By>,
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

#[derive(ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
enum By {
    Model,
    Key,
    Project,
    Day,
    Size,
    Operation,
    /// The billing basis: tokens, per_image, compute, flat.
    Basis,
    /// The service tier: default, flex, batch.
    Tier,
    /// No grouping: the total only.
    None,
}

impl By {
    fn dimension(self) -> Option<Dimension> {
        match self {
            Self::Model => Some(Dimension::Model),
            Self::Key => Some(Dimension::Key),
            Self::Project => Some(Dimension::Project),
            Self::Day => Some(Dimension::Day),
            Self::Size => Some(Dimension::Size),
            Self::Operation => Some(Dimension::Operation),
            Self::Basis => Some(Dimension::BillingBasis),
            Self::Tier => Some(Dimension::Tier),
            Self::None => None,
        }
    }
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
    // The grouping columns, in the order given, each once.
    let mut dims: Vec<By> = Vec::new();
    for by in &args.by {
        if *by != By::None && !dims.contains(by) {
            dims.push(*by);
        }
    }
    let mut group_by: Vec<Dimension> = dims.iter().filter_map(|d| d.dimension()).collect();
    // Always split by basis, so that each group can say how it was billed when it is billed one way.
    if !group_by.contains(&Dimension::BillingBasis) {
        group_by.push(Dimension::BillingBasis);
    }

    let ledger = args.config.open_ledger(ledger::LedgerOptions::default()).await?;
    let result = report(&ledger, &dims, &group_by, start, end, args.csv).await;
    ledger.close().await;
    let text = result?;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).map_err(|e| e.to_string())
}

async fn report(
    ledger: &Ledger,
    dims: &[By],
    group_by: &[Dimension],
    start: DateTime<Utc>,
    end: Option<DateTime<Utc>>,
    csv: bool,
) -> Result<String, String> {
    let query = UsageQuery { start, end, group_by: group_by.to_vec() };
    let rows = ledger.usage(&query).await.map_err(|e| e.to_string())?;
    let names = Names::load(ledger, dims).await?;
    let groups = merge(rows, dims);
    let mut total = Sums::default();
    for sums in groups.values() {
        total.add(sums);
    }
    Ok(if csv { to_csv(dims, &groups, &names) } else { to_table(dims, &groups, &total, &names, start, end) })
}

/// The sums of one group, with every billing basis its rows were billed by.
#[derive(Default)]
struct Sums {
    requests: u64,
    succeeded: u64,
    images: u64,
    input_text_tokens: u64,
    input_image_tokens: u64,
    output_tokens: u64,
    cost_usd: Decimal,
    bases: BTreeSet<String>,
}

impl Sums {
    fn add(&mut self, other: &Sums) {
        self.requests = self.requests.saturating_add(other.requests);
        self.succeeded = self.succeeded.saturating_add(other.succeeded);
        self.images = self.images.saturating_add(other.images);
        self.input_text_tokens = self.input_text_tokens.saturating_add(other.input_text_tokens);
        self.input_image_tokens = self.input_image_tokens.saturating_add(other.input_image_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.cost_usd += other.cost_usd;
        self.bases.extend(other.bases.iter().cloned());
    }

    fn of(row: &UsageRow) -> Self {
        Self {
            requests: row.requests,
            succeeded: row.succeeded,
            images: row.images,
            input_text_tokens: row.input_text_tokens,
            input_image_tokens: row.input_image_tokens,
            output_tokens: row.output_tokens,
            cost_usd: row.cost_usd,
            bases: row.billing_basis.iter().cloned().collect(),
        }
    }

    /// `tokens`, `per_image`, ..., or several joined by `+` when the group mixes them.
    fn basis(&self) -> String {
        if self.bases.is_empty() { "-".to_owned() } else { self.bases.iter().cloned().collect::<Vec<_>>().join("+") }
    }
}

/// The ledger's groups (split by basis too) merged into the groups asked for, keyed by their values in
/// the order of `dims` (so ordered by them).
fn merge(rows: Vec<UsageRow>, dims: &[By]) -> BTreeMap<Vec<Option<String>>, Sums> {
    let mut groups: BTreeMap<Vec<Option<String>>, Sums> = BTreeMap::new();
    for row in rows {
        let key = dims.iter().map(|d| value(&row, *d)).collect();
        groups.entry(key).or_default().add(&Sums::of(&row));
    }
    groups
}

/// The raw value of one grouping field: a key or project id, a day as `YYYY-MM-DD`.
fn value(row: &UsageRow, by: By) -> Option<String> {
    match by {
        By::Model => row.model.clone(),
        By::Key => row.key_id.clone(),
        By::Project => row.project_id.clone(),
        By::Day => row.day.map(|d| d.format("%Y-%m-%d").to_string()),
        By::Size => row.size.clone(),
        By::Operation => row.operation.clone(),
        By::Basis => row.billing_basis.clone(),
        By::Tier => row.tier.clone(),
        By::None => None,
    }
}

/// Key and project names, to show instead of bare ids.
#[derive(Default)]
struct Names {
    keys: HashMap<String, (String, String)>,
    projects: HashMap<String, String>,
}

impl Names {
    async fn load(ledger: &Ledger, dims: &[By]) -> Result<Self, String> {
        let mut names = Self::default();
        if dims.contains(&By::Key) {
            for key in ledger.list_keys().await.map_err(|e| e.to_string())? {
                names.keys.insert(key.id, (key.prefix, key.name));
            }
        }
        if dims.contains(&By::Project) {
            for project in ledger.list_projects().await.map_err(|e| e.to_string())? {
                names.projects.insert(project.id, project.name);
            }
        }
        Ok(names)
    }
}

/// Column headers of one grouping field: (table, CSV). The CSV has the basis as its last column always;
/// the table too, unless grouped by it.
fn headers(by: By) -> (&'static [&'static str], &'static [&'static str]) {
    match by {
        By::Model => (&["MODEL"], &["model"]),
        By::Key => (&["KEY", "KEY NAME"], &["key_id", "key_prefix", "key_name"]),
        By::Project => (&["PROJECT"], &["project_id", "project_name"]),
        By::Day => (&["DAY (UTC)"], &["day"]),
        By::Size => (&["SIZE"], &["size"]),
        By::Operation => (&["OPERATION"], &["operation"]),
        By::Tier => (&["TIER"], &["tier"]),
        By::Basis => (&["BILLED BY"], &[]),
        By::None => (&[], &[]),
    }
}

/// The table cells of one grouping field's value.
fn table_cells(by: By, value: Option<&str>, names: &Names) -> Vec<String> {
    match (by, value) {
        (By::Key, Some(id)) => match names.keys.get(id) {
            Some((prefix, name)) => vec![prefix.clone(), name.clone()],
            None => vec![id.to_owned(), "?".to_owned()],
        },
        (By::Key, None) => vec!["(no key)".to_owned(), String::new()],
        (By::Project, Some(id)) => vec![names.projects.get(id).cloned().unwrap_or_else(|| id.to_owned())],
        (By::Project, None) => vec!["(no project)".to_owned()],
        (_, value) => vec![value.unwrap_or("-").to_owned()],
    }
}

/// The CSV fields of one grouping field's value (empty where there is none), escaped with
/// [`csv_text`]: every one of them is text, and names and models come from users.
fn csv_cells(by: By, value: Option<&str>, names: &Names) -> Vec<String> {
    let value = value.unwrap_or("");
    let cells = match by {
        By::Key => {
            let (prefix, name) = names.keys.get(value).cloned().unwrap_or_default();
            vec![value.to_owned(), prefix, name]
        }
        By::Project => vec![value.to_owned(), names.projects.get(value).cloned().unwrap_or_default()],
        By::Model | By::Day | By::Size | By::Operation | By::Tier => vec![value.to_owned()],
        By::Basis | By::None => Vec::new(),
    };
    cells.iter().map(|cell| csv_text(cell)).collect()
}

/// The sums' columns; all but the last (the basis) are numbers. Tokens: input text, input image, output.
const SUM_HEADERS: [&str; 8] =
    ["REQUESTS", "SUCCEEDED", "IMAGES", "TEXT TOKENS", "IMAGE TOKENS", "OUTPUT TOKENS", "COST USD", "BILLED BY"];
const SUM_CSV_HEADERS: [&str; 8] = [
    "requests",
    "succeeded",
    "images",
    "input_text_tokens",
    "input_image_tokens",
    "output_tokens",
    "cost_usd",
    "billing_basis",
];

/// The sums' cells, and the basis unless `with_basis` is false.
fn sum_cells(sums: &Sums, money: fn(Decimal) -> String, with_basis: bool) -> Vec<String> {
    let mut cells = vec![
        sums.requests.to_string(),
        sums.succeeded.to_string(),
        sums.images.to_string(),
        sums.input_text_tokens.to_string(),
        sums.input_image_tokens.to_string(),
        sums.output_tokens.to_string(),
        money(sums.cost_usd),
    ];
    if with_basis {
        cells.push(sums.basis());
    }
    cells
}

fn to_table(
    dims: &[By],
    groups: &BTreeMap<Vec<Option<String>>, Sums>,
    total: &Sums,
    names: &Names,
    start: DateTime<Utc>,
    end: Option<DateTime<Utc>>,
) -> String {
    let mut headers_row: Vec<String> = Vec::new();
    for by in dims {
        headers_row.extend(headers(*by).0.iter().map(|h| (*h).to_owned()));
    }
    if headers_row.is_empty() {
        // Not grouped: one column, to hold the total's label.
        headers_row.push(String::new());
    }
    let group_columns = headers_row.len();
    let with_basis = !dims.contains(&By::Basis);
    let sum_headers = if with_basis { &SUM_HEADERS[..] } else { &SUM_HEADERS[..SUM_HEADERS.len() - 1] };
    headers_row.extend(sum_headers.iter().map(|h| (*h).to_owned()));
    let mut rows = vec![headers_row];
    for (key, sums) in groups {
        let mut row = Vec::new();
        for (by, value) in dims.iter().zip(key) {
            row.extend(table_cells(*by, value.as_deref(), names));
        }
        row.extend(sum_cells(sums, pricing::format_usd, with_basis));
        rows.push(row);
    }
    let body_end = rows.len();
    let mut total_row = vec!["TOTAL".to_owned()];
    total_row.resize(group_columns, String::new());
    total_row.extend(sum_cells(total, pricing::format_usd, with_basis));
    rows.push(total_row);
    let numeric = |i: usize| i >= group_columns && i < group_columns + SUM_HEADERS.len() - 1;

    let until = end.map_or_else(|| "now".to_owned(), fmt_time);
    let grouping = if dims.is_empty() {
        String::new()
    } else {
        format!(", by {}", dims.iter().map(|d| format!("{d:?}").to_lowercase()).collect::<Vec<_>>().join(", "))
    };
    let mut out = format!("Usage from {} to {until}{grouping}\n", fmt_time(start));
    out.push_str(&table(&rows, numeric, Some(body_end).filter(|end| *end > 1)));
    out.push_str(&legend(&total.bases));
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

fn to_csv(dims: &[By], groups: &BTreeMap<Vec<Option<String>>, Sums>, names: &Names) -> String {
    let mut header: Vec<String> = Vec::new();
    for by in dims {
        header.extend(headers(*by).1.iter().map(|h| (*h).to_owned()));
    }
    header.extend(SUM_CSV_HEADERS.iter().map(|h| (*h).to_owned()));
    let mut out = csv_line(&header);
    for (key, sums) in groups {
        let mut row = Vec::new();
        for (by, value) in dims.iter().zip(key) {
            row.extend(csv_cells(*by, value.as_deref(), names));
        }
        // The numbers are ours, written as they are; the basis is text read from the ledger.
        row.extend(sum_cells(sums, |d| d.normalize().to_string(), false));
        row.push(csv_text(&sums.basis()));
        out.push_str(&csv_line(&row));
    }
    out
}

/// `s` as it may be shown in a terminal: every control character (C0, DEL and C1, the characters
/// that start escape sequences, move the cursor or return to the start of the line) written as a
/// visible escape (`\u{1b}`, `\t`, `\n`), so that a name holding `ESC [2J` shows as text instead of
/// clearing the operator's screen. Everything else, non-ASCII letters included, is left as it is.
pub(crate) fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The first characters that make a spreadsheet read a cell as a formula (OWASP's list: `=`, `+`,
/// `-`, `@`, tab, carriage return), and the full-width forms that some locales' spreadsheets read
/// as the same.
const FORMULA_STARTS: [char; 10] = ['=', '+', '-', '@', '\t', '\r', '\u{FF1D}', '\u{FF0B}', '\u{FF0D}', '\u{FF20}'];

/// A text cell from users (a name, a model, a size) for a spreadsheet: [`printable`] (CSV is often
/// printed to a terminal too), then, if it would start a formula (`=HYPERLINK(...)`), prefixed with
/// `'` so that spreadsheets show it as text (OWASP's advice against CSV injection). Quoting is left
/// to [`csv_line`]. Only for text: the numbers this command writes itself are never passed here, so
/// they stay numbers.
fn csv_text(s: &str) -> String {
    let s = printable(s);
    if s.starts_with(FORMULA_STARTS) { format!("'{s}") } else { s.into_owned() }
}

/// One CSV record (RFC 4180): fields with a comma, quote or line break are quoted.
fn csv_line(fields: &[String]) -> String {
    let quoted: Vec<String> = fields
        .iter()
        .map(|f| if f.contains([',', '"', '\n', '\r']) { format!("\"{}\"", f.replace('"', "\"\"")) } else { f.clone() })
        .collect();
    format!("{}\n", quoted.join(","))
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

/// A time given on the command line: `now`, a time ago (`30d`, `12h`, `90m`, `2w`), a UTC date (its
/// midnight; the next midnight when `end_of_day`) or an RFC 3339 time.
fn parse_when(s: &str, now: DateTime<Utc>, end_of_day: bool) -> Result<DateTime<Utc>, String> {
    let s = s.trim();
    const FORMS: &str = "expected a time ago (30d, 12h, 90m, 2w), a date (2026-11-01) or an RFC 3339 time";
    if s == "now" {
        return Ok(now);
    }
    if let Some(unit) = s.chars().last().filter(|c| c.is_ascii_alphabetic()) {
        let digits = &s[..s.len() - unit.len_utf8()];
        if !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) {
            let n: i64 = digits.parse().map_err(|_| format!("{s} is too long ago"))?;
            let ago = match unit {
                'm' => TimeDelta::try_minutes(n),
                'h' => TimeDelta::try_hours(n),
                'd' => TimeDelta::try_days(n),
                'w' => TimeDelta::try_weeks(n),
                _ => return Err(format!("unknown unit {unit:?}: {FORMS}")),
            };
            return ago.and_then(|ago| now.checked_sub_signed(ago)).ok_or_else(|| format!("{s} is too long ago"));
        }
    }
    if let Ok(date) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        let date = if end_of_day { date.succ_opt().ok_or_else(|| format!("{s} is out of range"))? } else { date };
        return Ok(date.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc)).map_err(|_| FORMS.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn times_parse() {
        let now = at("2026-11-15T12:30:00Z");
        assert_eq!(parse_when("30d", now, false).unwrap(), at("2026-10-16T12:30:00Z"));
        assert_eq!(parse_when("12h", now, false).unwrap(), at("2026-11-15T00:30:00Z"));
        assert_eq!(parse_when("90m", now, false).unwrap(), at("2026-11-15T11:00:00Z"));
        assert_eq!(parse_when("2w", now, false).unwrap(), at("2026-11-01T12:30:00Z"));
        assert_eq!(parse_when("now", now, false).unwrap(), now);
        assert_eq!(parse_when("2026-11-01", now, false).unwrap(), at("2026-11-01T00:00:00Z"));
        assert_eq!(parse_when("2026-11-01", now, true).unwrap(), at("2026-11-02T00:00:00Z"));
        assert_eq!(parse_when("2026-11-01T10:00:00+01:00", now, false).unwrap(), at("2026-11-01T09:00:00Z"));
        for bad in ["", "d", "30x", "30 days", "2026-13-01", "99999999999999999999d"] {
            assert!(parse_when(bad, now, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn csv_quotes_what_needs_it() {
        let fields = ["a".to_owned(), "b,c".to_owned(), "say \"hi\"".to_owned(), String::new()];
        assert_eq!(csv_line(&fields), "a,\"b,c\",\"say \"\"hi\"\"\",\n");
    }

    #[test]
    fn printable_escapes_control_characters_visibly() {
        assert!(matches!(printable("café ☕ =1+2"), Cow::Borrowed("café ☕ =1+2")), "plain text is untouched");
        assert_eq!(printable("\u{1b}[2J\u{1b}[31mpwned"), "\\u{1b}[2J\\u{1b}[31mpwned");
        assert_eq!(printable("a\tb\r\nc\0"), "a\\tb\\r\\nc\\0");
        // DEL, and C1's CSI (U+009B), which some terminals obey like ESC [.
        assert_eq!(printable("x\u{7f}\u{9b}2J"), "x\\u{7f}\\u{9b}2J");
        for s in ["\u{1b}]0;title\u{7}", "\u{85}", "bell\u{7}"] {
            assert!(!printable(s).chars().any(char::is_control), "{s:?}");
        }
    }

    #[test]
    fn csv_text_defuses_formulas_and_control_characters() {
        assert_eq!(csv_text("=HYPERLINK(\"http://evil\",\"x\")"), "'=HYPERLINK(\"http://evil\",\"x\")");
        for start in ["+", "-", "@", "\u{FF1D}", "\u{FF0B}", "\u{FF0D}", "\u{FF20}"] {
            let cell = format!("{start}cmd|' /C calc'!A0");
            assert_eq!(csv_text(&cell), format!("'{cell}"));
        }
        // A leading tab or carriage return is shown as an escape, which no spreadsheet runs.
        assert_eq!(csv_text("\t=1+2"), "\\t=1+2");
        assert_eq!(csv_text("\r=1+2"), "\\r=1+2");
        // Text that starts a formula only further on, and ordinary names, are left alone.
        for plain in ["alpha", "gpt-image-1", "1024x1024", "a=b", "x-@", "", "'quoted"] {
            assert_eq!(csv_text(plain), plain);
        }
        // Quoting (RFC 4180) comes after the prefix: the quote cannot end the cell early.
        let fields = [csv_text("=1+2\";=1+2"), csv_text("-2,3"), "0.5".to_owned()];
        assert_eq!(csv_line(&fields), "\"'=1+2\"\";=1+2\",\"'-2,3\",0.5\n");
    }

    #[test]
    fn csv_cells_escape_names_and_models_but_not_numbers() {
        let mut names = Names::default();
        names.keys.insert("key_1".into(), ("ig-AbCd1234".into(), "=1+2".into()));
        names.projects.insert("proj_1".into(), "@SUM(A1)\u{1b}[2J".into());
        assert_eq!(csv_cells(By::Key, Some("key_1"), &names), ["key_1", "ig-AbCd1234", "'=1+2"]);
        assert_eq!(csv_cells(By::Project, Some("proj_1"), &names), ["proj_1", "'@SUM(A1)\\u{1b}[2J"]);
        assert_eq!(csv_cells(By::Model, Some("-x"), &names), ["'-x"]);
        assert_eq!(csv_cells(By::Size, Some("+1"), &names), ["'+1"]);
        let mut groups = BTreeMap::new();
        let sums =
            Sums { requests: 1, cost_usd: Decimal::new(-5, 1), bases: ["=tokens".into()].into(), ..Sums::default() };
        groups.insert(vec![Some("=m".to_owned())], sums);
        let csv = to_csv(&[By::Model], &groups, &names);
        // (A negative cost never occurs; it shows that our numbers are written as numbers.)
        assert_eq!(csv.lines().nth(1), Some("'=m,1,0,0,0,0,0,-0.5,'=tokens"), "{csv}");
    }

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
