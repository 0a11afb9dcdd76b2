//! Usage reports: the ledger's sums over a time range, grouped the way a person asked (by model and
//! day, by key, ...), with key and project names, and as CSV. One layer for every place that shows
//! them: `imagegate usage` (tables and `--csv`) and the console's download are the same rows.
//!
//! Names and models come from users (an admin's key names, any client's model string), so every text
//! cell written out is escaped: control characters shown as visible escapes ([`printable`]), and CSV
//! cells that a spreadsheet would run as a formula prefixed with `'` ([`csv_text`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, NaiveDate, NaiveTime, TimeDelta, Utc};
use rust_decimal::Decimal;

use crate::db::Ledger;
use crate::error::Result;
use crate::usage::{Dimension, UsageQuery, UsageRow};

/// What a report can be grouped by, in the order a person lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum By {
    Model,
    Key,
    Project,
    /// Where it ran: `local` or an upstream.
    Provider,
    /// The UTC day.
    Day,
    Size,
    Operation,
    /// The billing basis: tokens, per_image, compute, flat.
    Basis,
    /// The service tier: default, flex, batch.
    Tier,
}

impl By {
    /// Every grouping, in the order of [`By::as_str`]'s names in help texts.
    pub const ALL: [By; 9] = [
        Self::Model,
        Self::Key,
        Self::Project,
        Self::Provider,
        Self::Day,
        Self::Size,
        Self::Operation,
        Self::Tier,
        Self::Basis,
    ];

    /// The name used on the command line and in the console's URLs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::Key => "key",
            Self::Project => "project",
            Self::Provider => "provider",
            Self::Day => "day",
            Self::Size => "size",
            Self::Operation => "operation",
            Self::Basis => "basis",
            Self::Tier => "tier",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.as_str() == s)
    }

    /// The ledger's grouping this stands for.
    pub fn dimension(self) -> Dimension {
        match self {
            Self::Model => Dimension::Model,
            Self::Key => Dimension::Key,
            Self::Project => Dimension::Project,
            Self::Provider => Dimension::Provider,
            Self::Day => Dimension::Day,
            Self::Size => Dimension::Size,
            Self::Operation => Dimension::Operation,
            Self::Basis => Dimension::BillingBasis,
            Self::Tier => Dimension::Tier,
        }
    }

    /// The raw value of this field in a row: a key or project id, a day as `YYYY-MM-DD`.
    pub fn value(self, row: &UsageRow) -> Option<String> {
        match self {
            Self::Model => row.model.clone(),
            Self::Key => row.key_id.clone(),
            Self::Project => row.project_id.clone(),
            Self::Provider => row.provider.clone(),
            Self::Day => row.day.map(|d| d.format("%Y-%m-%d").to_string()),
            Self::Size => row.size.clone(),
            Self::Operation => row.operation.clone(),
            Self::Basis => row.billing_basis.clone(),
            Self::Tier => row.tier.clone(),
        }
    }

    /// The CSV columns of this field. The basis has none: every CSV row ends with it.
    fn csv_headers(self) -> &'static [&'static str] {
        match self {
            Self::Model => &["model"],
            Self::Key => &["key_id", "key_prefix", "key_name"],
            Self::Project => &["project_id", "project_name"],
            Self::Provider => &["provider"],
            Self::Day => &["day"],
            Self::Size => &["size"],
            Self::Operation => &["operation"],
            Self::Tier => &["tier"],
            Self::Basis => &[],
        }
    }
}

/// The sums of one group, with every billing basis its rows were billed by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sums {
    pub requests: u64,
    pub succeeded: u64,
    pub images: u64,
    pub input_text_tokens: u64,
    pub input_image_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: Decimal,
    pub bases: BTreeSet<String>,
}

impl Sums {
    pub fn add(&mut self, other: &Sums) {
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
    pub fn basis(&self) -> String {
        if self.bases.is_empty() { "-".to_owned() } else { self.bases.iter().cloned().collect::<Vec<_>>().join("+") }
    }
}

/// Key and project names, to show instead of bare ids.
#[derive(Debug, Clone, Default)]
pub struct Names {
    /// Key id to (prefix, name).
    pub keys: HashMap<String, (String, String)>,
    /// Project id to name.
    pub projects: HashMap<String, String>,
}

/// A usage report: the groups asked for over `[start, end)`, ordered by their values, and the total.
#[derive(Debug, Clone)]
pub struct Report {
    pub by: Vec<By>,
    pub start: DateTime<Utc>,
    /// `None`: up to when the report was made.
    pub end: Option<DateTime<Utc>>,
    /// Each group's values (in the order of `by`) and sums.
    pub groups: BTreeMap<Vec<Option<String>>, Sums>,
    pub total: Sums,
    pub names: Names,
}

impl Ledger {
    /// The usage report over `[start, end)` grouped by `by` (each field once, in the order given; empty:
    /// the total only).
    pub async fn usage_report(&self, by: &[By], start: DateTime<Utc>, end: Option<DateTime<Utc>>) -> Result<Report> {
        let mut fields: Vec<By> = Vec::new();
        for b in by {
            if !fields.contains(b) {
                fields.push(*b);
            }
        }
        let mut group_by: Vec<Dimension> = fields.iter().map(|b| b.dimension()).collect();
        // Always split by basis too, so that each group can say how it was billed.
        if !group_by.contains(&Dimension::BillingBasis) {
            group_by.push(Dimension::BillingBasis);
        }
        let rows = self.usage(&UsageQuery { start, end, group_by }).await?;
        let mut names = Names::default();
        if fields.contains(&By::Key) {
            for key in self.list_keys().await? {
                names.keys.insert(key.id, (key.prefix, key.name));
            }
        }
        if fields.contains(&By::Project) {
            for project in self.list_projects().await? {
                names.projects.insert(project.id, project.name);
            }
        }
        let mut groups: BTreeMap<Vec<Option<String>>, Sums> = BTreeMap::new();
        let mut total = Sums::default();
        for row in rows {
            let sums = Sums::of(&row);
            total.add(&sums);
            groups.entry(fields.iter().map(|b| b.value(&row)).collect()).or_default().add(&sums);
        }
        Ok(Report { by: fields, start, end, groups, total, names })
    }
}

/// The sums' CSV columns, after the grouping columns.
pub const SUM_CSV_HEADERS: [&str; 8] = [
    "requests",
    "succeeded",
    "images",
    "input_text_tokens",
    "input_image_tokens",
    "output_tokens",
    "cost_usd",
    "billing_basis",
];

impl Report {
    /// The report as CSV (RFC 4180), a header row and one row per group, no total row. Numbers are
    /// written as numbers (costs exact, as decimals); text cells through [`csv_text`].
    pub fn csv(&self) -> String {
        let mut header: Vec<String> = Vec::new();
        for by in &self.by {
            header.extend(by.csv_headers().iter().map(|h| (*h).to_owned()));
        }
        header.extend(SUM_CSV_HEADERS.iter().map(|h| (*h).to_owned()));
        let mut out = csv_line(&header);
        for (values, sums) in &self.groups {
            let mut row = Vec::new();
            for (by, value) in self.by.iter().zip(values) {
                row.extend(self.csv_cells(*by, value.as_deref()));
            }
            row.extend(sum_cells(sums, |d| d.normalize().to_string()));
            row.push(csv_text(&sums.basis()));
            out.push_str(&csv_line(&row));
        }
        out
    }

    /// The CSV fields of one grouping value (empty where there is none), escaped with [`csv_text`].
    fn csv_cells(&self, by: By, value: Option<&str>) -> Vec<String> {
        let value = value.unwrap_or("");
        let cells = match by {
            By::Key => {
                let (prefix, name) = self.names.keys.get(value).cloned().unwrap_or_default();
                vec![value.to_owned(), prefix, name]
            }
            By::Project => vec![value.to_owned(), self.names.projects.get(value).cloned().unwrap_or_default()],
            By::Basis => Vec::new(),
            _ => vec![value.to_owned()],
        };
        cells.iter().map(|cell| csv_text(cell)).collect()
    }

    /// How a person reads one grouping value: a key as (prefix, name), a project by its name, a missing
    /// value as `(no key)`, `(no project)` or `-`. Not escaped.
    pub fn label(&self, by: By, value: Option<&str>) -> Vec<String> {
        match (by, value) {
            (By::Key, Some(id)) => match self.names.keys.get(id) {
                Some((prefix, name)) => vec![prefix.clone(), name.clone()],
                None => vec![id.to_owned(), "?".to_owned()],
            },
            (By::Key, None) => vec!["(no key)".to_owned(), String::new()],
            (By::Project, Some(id)) => vec![self.names.projects.get(id).cloned().unwrap_or_else(|| id.to_owned())],
            (By::Project, None) => vec!["(no project)".to_owned()],
            (_, value) => vec![value.unwrap_or("-").to_owned()],
        }
    }
}

/// The sums' numeric cells (without the basis): requests, succeeded, images, the three token counts
/// and the cost written by `money`.
pub fn sum_cells(sums: &Sums, money: impl Fn(Decimal) -> String) -> Vec<String> {
    vec![
        sums.requests.to_string(),
        sums.succeeded.to_string(),
        sums.images.to_string(),
        sums.input_text_tokens.to_string(),
        sums.input_image_tokens.to_string(),
        sums.output_tokens.to_string(),
        money(sums.cost_usd),
    ]
}

/// `s` as it may be shown in a terminal: every control character (C0, DEL and C1, the characters
/// that start escape sequences, move the cursor or return to the start of the line) written as a
/// visible escape (`\u{1b}`, `\t`, `\n`), so that a name holding `ESC [2J` shows as text instead of
/// clearing the operator's screen. Everything else, non-ASCII letters included, is left as it is.
pub fn printable(s: &str) -> Cow<'_, str> {
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
/// to [`csv_line`]. Only for text: the numbers written by the report itself are never passed here,
/// so they stay numbers.
pub fn csv_text(s: &str) -> String {
    let s = printable(s);
    if s.starts_with(FORMULA_STARTS) { format!("'{s}") } else { s.into_owned() }
}

/// One CSV record (RFC 4180): fields with a comma, quote or line break are quoted.
pub fn csv_line(fields: &[String]) -> String {
    let quoted: Vec<String> = fields
        .iter()
        .map(|f| if f.contains([',', '"', '\n', '\r']) { format!("\"{}\"", f.replace('"', "\"\"")) } else { f.clone() })
        .collect();
    format!("{}\n", quoted.join(","))
}

/// A time a person gives a report: `now`, a time ago (`30d`, `12h`, `90m`, `2w`), a UTC date (its
/// midnight; the next midnight when `end_of_day`, so that a date as the end includes that whole day)
/// or an RFC 3339 time.
pub fn parse_when(s: &str, now: DateTime<Utc>, end_of_day: bool) -> std::result::Result<DateTime<Utc>, String> {
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
        return Ok(date.and_time(NaiveTime::MIN).and_utc());
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

    fn report(by: Vec<By>, names: Names) -> Report {
        let start = at("2026-11-01T00:00:00Z");
        Report { by, start, end: None, groups: BTreeMap::new(), total: Sums::default(), names }
    }

    #[test]
    fn csv_escapes_names_and_models_but_not_numbers() {
        let mut names = Names::default();
        names.keys.insert("key_1".into(), ("ig-AbCd1234".into(), "=1+2".into()));
        names.projects.insert("proj_1".into(), "@SUM(A1)\u{1b}[2J".into());
        let r = report(vec![By::Model], names);
        assert_eq!(r.csv_cells(By::Key, Some("key_1")), ["key_1", "ig-AbCd1234", "'=1+2"]);
        assert_eq!(r.csv_cells(By::Project, Some("proj_1")), ["proj_1", "'@SUM(A1)\\u{1b}[2J"]);
        assert_eq!(r.csv_cells(By::Model, Some("-x")), ["'-x"]);
        assert_eq!(r.csv_cells(By::Size, Some("+1")), ["'+1"]);
        assert_eq!(r.csv_cells(By::Provider, Some("=up")), ["'=up"]);
        let mut r = r;
        let sums =
            Sums { requests: 1, cost_usd: Decimal::new(-5, 1), bases: ["=tokens".into()].into(), ..Sums::default() };
        r.groups.insert(vec![Some("=m".to_owned())], sums);
        let csv = r.csv();
        assert_eq!(
            csv.lines().next(),
            Some(
                "model,requests,succeeded,images,input_text_tokens,input_image_tokens,output_tokens,cost_usd,billing_basis"
            )
        );
        // (A negative cost never occurs; it shows that our numbers are written as numbers.)
        assert_eq!(csv.lines().nth(1), Some("'=m,1,0,0,0,0,0,-0.5,'=tokens"), "{csv}");
    }

    #[test]
    fn groupings_have_names_both_ways() {
        for by in By::ALL {
            assert_eq!(By::parse(by.as_str()), Some(by));
        }
        assert_eq!(By::parse("none"), None);
    }
}
