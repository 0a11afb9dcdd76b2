//! `imagegate keys create|list|update|revoke` and `imagegate keys project create|list|update`: API keys,
//! their projects and budgets, in the database `serve` reads (`--database-url`, or the SQLite file in
//! `--data-dir`). A secret is printed once, alone on the last stdout line of `keys create`, so that
//! `KEY=$(imagegate keys create --name ci | tail -1)` works; nothing else ever shows it (only its
//! SHA-256 is stored).
//!
//! Names are chosen by users (here, or through the admin API): a new name with a control character
//! is refused, and every name printed to the terminal goes through [`printable`], for the names
//! stored before that rule. `--json` output is left to serde, which escapes them.

use std::collections::HashMap;
use std::io::Write as _;

use clap::{Args, Subcommand, ValueEnum};
use ledger::{
    ApiKey, Budget, BudgetUsage, Decimal, KeyUpdate, Ledger, NewKey, NewProject, Period, Project, ProjectUpdate,
    RateLimits, Scope,
};
use serde_json::{Value, json};

use crate::ConfigArgs;
use crate::usage::{fmt_time, printable, rfc3339, table};

#[derive(Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key. Prints its id, prefix, scope and budget, then the secret alone on the last line
    /// (shown this once: only its digest is stored).
    Create(CreateArgs),
    /// List the keys (revoked ones too) with their budgets and this period's spending. Never a secret.
    List(ListArgs),
    /// Change a key's name, budget, models or rate limits. Spending this period is kept.
    Update(UpdateArgs),
    /// Revoke a key: it fails on the very next request, on every instance.
    Revoke(RevokeArgs),
    /// Projects: groups of keys sharing one budget.
    Project(ProjectArgs),
}

#[derive(ValueEnum, Clone, Copy)]
enum ScopeArg {
    User,
    Admin,
}

#[derive(ValueEnum, Clone, Copy)]
enum PeriodArg {
    Day,
    Week,
    Month,
    Total,
}

impl From<PeriodArg> for Period {
    fn from(p: PeriodArg) -> Self {
        match p {
            PeriodArg::Day => Period::Day,
            PeriodArg::Week => Period::Week,
            PeriodArg::Month => Period::Month,
            PeriodArg::Total => Period::Total,
        }
    }
}

/// A budget's limits, each optional; any of them makes a budget.
#[derive(Args)]
struct BudgetArgs {
    /// Hard cap in USD per period: a request whose worst-case cost does not fit is refused.
    #[arg(long, value_name = "USD")]
    budget_usd: Option<Decimal>,
    /// The budget's period, on UTC calendar boundaries (weeks start on Monday); `total` never resets
    /// [default: month, or the budget's current period on update].
    #[arg(long, value_enum)]
    period: Option<PeriodArg>,
    /// Soft threshold in USD per period: crossing it is reported (a response header), nothing refused.
    #[arg(long, value_name = "USD")]
    soft_budget_usd: Option<Decimal>,
    /// At most this many images per period.
    #[arg(long, value_name = "N")]
    image_quota: Option<u64>,
}

impl BudgetArgs {
    fn is_empty(&self) -> bool {
        self.budget_usd.is_none()
            && self.period.is_none()
            && self.soft_budget_usd.is_none()
            && self.image_quota.is_none()
    }

    /// The budget these flags set on top of `current` (a new budget when there is none); `None` when
    /// no flag is given.
    fn apply(&self, current: Option<&Budget>) -> Result<Option<Budget>, String> {
        if self.is_empty() {
            return Ok(None);
        }
        for (flag, amount) in [("--budget-usd", self.budget_usd), ("--soft-budget-usd", self.soft_budget_usd)] {
            if amount.is_some_and(|a| a < Decimal::ZERO) {
                return Err(format!("{flag} cannot be negative"));
            }
        }
        let mut budget = match current {
            Some(budget) => budget.clone(),
            None => {
                if self.budget_usd.is_none() && self.soft_budget_usd.is_none() && self.image_quota.is_none() {
                    return Err(
                        "--period needs a limit to apply to: --budget-usd, --soft-budget-usd or --image-quota".into()
                    );
                }
                Budget { period: Period::Month, limit_usd: None, soft_limit_usd: None, image_quota: None }
            }
        };
        if let Some(period) = self.period {
            budget.period = period.into();
        }
        if let Some(limit) = self.budget_usd {
            budget.limit_usd = Some(limit);
        }
        if let Some(soft) = self.soft_budget_usd {
            budget.soft_limit_usd = Some(soft);
        }
        if let Some(quota) = self.image_quota {
            budget.image_quota = Some(quota);
        }
        Ok(Some(budget))
    }
}

#[derive(Args)]
struct CreateArgs {
    /// A name for people (who or what uses the key).
    #[arg(long)]
    name: String,
    /// `admin` keys may also manage keys and read the organization's usage.
    #[arg(long, value_enum, default_value = "user")]
    scope: ScopeArg,
    #[command(flatten)]
    budget: BudgetArgs,
    /// The models the key may use, comma-separated (names or aliases as clients send them)
    /// [default: all].
    #[arg(long, value_delimiter = ',', value_name = "MODELS")]
    models: Option<Vec<String>>,
    /// The project the key belongs to (its budget applies too); created, without a budget, if missing.
    #[arg(long, value_name = "NAME")]
    project: Option<String>,
    /// At most this many requests per minute.
    #[arg(long, value_name = "N")]
    rpm: Option<u32>,
    /// At most this many images per minute.
    #[arg(long, value_name = "N")]
    ipm: Option<u32>,
    /// The tier of its requests that leave it to the server (`service_tier` auto or none): flex runs
    /// them at half price when capacity is free (429 when there is none).
    #[arg(long, value_parser = ["default", "flex"], value_name = "TIER")]
    service_tier: Option<String>,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Args)]
struct ListArgs {
    /// Print a JSON array (amounts as decimal strings) instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Args)]
struct UpdateArgs {
    /// The key: its id (`key_...`) or its visible prefix (`ig-AbCd1234`), as `keys list` shows.
    #[arg(value_name = "ID_OR_PREFIX")]
    key: String,
    /// A new name.
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    budget: BudgetArgs,
    /// Remove the key's budget (its project's budget still applies).
    #[arg(long, conflicts_with_all = ["budget_usd", "period", "soft_budget_usd", "image_quota"])]
    no_budget: bool,
    /// Allow only these models, comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "MODELS")]
    models: Option<Vec<String>>,
    /// Allow every model.
    #[arg(long, conflicts_with = "models")]
    all_models: bool,
    /// At most this many requests per minute.
    #[arg(long, value_name = "N")]
    rpm: Option<u32>,
    /// At most this many images per minute.
    #[arg(long, value_name = "N")]
    ipm: Option<u32>,
    /// The tier of its requests that leave it to the server (`service_tier` auto or none): flex runs
    /// them at half price when capacity is free (429 when there is none).
    #[arg(long, value_parser = ["default", "flex"], value_name = "TIER")]
    service_tier: Option<String>,
    /// Remove both rate limits.
    #[arg(long, conflicts_with_all = ["rpm", "ipm"])]
    no_rate_limits: bool,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Args)]
struct RevokeArgs {
    /// The key: its id (`key_...`) or its visible prefix (`ig-AbCd1234`), as `keys list` shows.
    #[arg(value_name = "ID_OR_PREFIX")]
    key: String,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Args)]
struct ProjectArgs {
    #[command(subcommand)]
    command: ProjectCommand,
}

#[derive(Subcommand)]
enum ProjectCommand {
    /// Create a project, with an optional budget shared by all its keys.
    Create(ProjectCreateArgs),
    /// List the projects with their budgets, this period's spending and their keys.
    List(ListArgs),
    /// Change a project's name or budget (`--name NAME` picks it, `--rename` renames it).
    Update(ProjectUpdateArgs),
}

#[derive(Args)]
struct ProjectCreateArgs {
    #[arg(long)]
    name: String,
    #[command(flatten)]
    budget: BudgetArgs,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Args)]
struct ProjectUpdateArgs {
    /// The project: its name or id (or use --name).
    #[arg(value_name = "PROJECT", required_unless_present = "name", conflicts_with = "name")]
    project: Option<String>,
    /// The project's name.
    #[arg(long)]
    name: Option<String>,
    /// A new name.
    #[arg(long, value_name = "NEW_NAME")]
    rename: Option<String>,
    #[command(flatten)]
    budget: BudgetArgs,
    /// Remove the project's budget.
    #[arg(long, conflicts_with_all = ["budget_usd", "period", "soft_budget_usd", "image_quota"])]
    no_budget: bool,
    #[command(flatten)]
    config: ConfigArgs,
}

pub async fn run(args: KeysArgs) -> Result<(), String> {
    let config = match &args.command {
        KeysCommand::Create(a) => &a.config,
        KeysCommand::List(a) => &a.config,
        KeysCommand::Update(a) => &a.config,
        KeysCommand::Revoke(a) => &a.config,
        KeysCommand::Project(p) => match &p.command {
            ProjectCommand::Create(a) => &a.config,
            ProjectCommand::List(a) => &a.config,
            ProjectCommand::Update(a) => &a.config,
        },
    };
    let ledger = config.open_ledger(ledger::LedgerOptions::default()).await?;
    let result = match args.command {
        KeysCommand::Create(a) => create(&ledger, a).await,
        KeysCommand::List(a) => list(&ledger, a.json).await,
        KeysCommand::Update(a) => update(&ledger, a).await,
        KeysCommand::Revoke(a) => revoke(&ledger, &a.key).await,
        KeysCommand::Project(p) => match p.command {
            ProjectCommand::Create(a) => project_create(&ledger, a).await,
            ProjectCommand::List(a) => project_list(&ledger, a.json).await,
            ProjectCommand::Update(a) => project_update(&ledger, a).await,
        },
    };
    ledger.close().await;
    let text = result?;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(|e| e.to_string())
}

fn err(e: ledger::LedgerError) -> String {
    e.to_string()
}

/// A name for a new key or project given with `flag`, or the error naming the flag: not empty, no
/// control characters (the ledger's own rule, checked here to name the flag).
fn check_name(flag: &str, name: &str) -> Result<(), String> {
    ledger::keys::name_problem(name).map_or(Ok(()), |problem| Err(format!("{flag} {problem}")))
}

async fn create(ledger: &Ledger, args: CreateArgs) -> Result<String, String> {
    check_name("--name", &args.name)?;
    let budget = args.budget.apply(None)?;
    let allowed_models = args.models.map(clean_models).transpose()?;
    let project = match &args.project {
        Some(name) => Some(match ledger.project_by_name(name).await.map_err(err)? {
            Some(project) => project,
            None => {
                check_name("--project", name)?;
                let project =
                    ledger.create_project(NewProject { name: name.clone(), budget: None }).await.map_err(err)?;
                eprintln!("created project {} ({}), without a budget", printable(&project.name), project.id);
                project
            }
        }),
        None => None,
    };
    let new = NewKey {
        name: args.name,
        scope: match args.scope {
            ScopeArg::User => Scope::User,
            ScopeArg::Admin => Scope::Admin,
        },
        project_id: project.as_ref().map(|p| p.id.clone()),
        allowed_models,
        budget,
        rate_limits: RateLimits { requests_per_minute: args.rpm, images_per_minute: args.ipm },
        service_tier: args.service_tier,
    };
    let created = ledger.create_key(new).await.map_err(err)?;
    let mut text = describe_key(&created.key, project.as_ref());
    eprintln!("The secret is the last line: keep it now, it cannot be shown again (only its SHA-256 is stored).");
    text.push_str(&created.secret);
    text.push('\n');
    Ok(text)
}

async fn update(ledger: &Ledger, args: UpdateArgs) -> Result<String, String> {
    if let Some(name) = &args.name {
        check_name("--name", name)?;
    }
    let key = resolve_key(ledger, &args.key).await?;
    let budget = if args.no_budget { Some(None) } else { args.budget.apply(key.budget.as_ref())?.map(Some) };
    let allowed_models =
        if args.all_models { Some(None) } else { args.models.map(clean_models).transpose()?.map(Some) };
    let rate_limits = if args.no_rate_limits {
        Some(RateLimits::default())
    } else if args.rpm.is_some() || args.ipm.is_some() {
        Some(RateLimits {
            requests_per_minute: args.rpm.or(key.rate_limits.requests_per_minute),
            images_per_minute: args.ipm.or(key.rate_limits.images_per_minute),
        })
    } else {
        None
    };
    let service_tier = args.service_tier.map(|t| Some(t).filter(|t| t != "default"));
    let update = KeyUpdate { name: args.name, allowed_models, budget, rate_limits, service_tier };
    if update == KeyUpdate::default() {
        return Err("nothing to change: give --name, a budget flag (--budget-usd, --period, --soft-budget-usd, \
                    --image-quota, --no-budget), --models, --all-models, --rpm, --ipm, --no-rate-limits or --service-tier"
            .into());
    }
    let key = ledger.update_key(&key.id, update).await.map_err(err)?;
    let project = match &key.project_id {
        Some(id) => Some(ledger.get_project(id).await.map_err(err)?),
        None => None,
    };
    Ok(format!("updated key {}\n{}", key.id, describe_key(&key, project.as_ref())))
}

async fn revoke(ledger: &Ledger, id_or_prefix: &str) -> Result<String, String> {
    let key = resolve_key(ledger, id_or_prefix).await?;
    if let Some(at) = key.revoked_at {
        let name = printable(&key.name);
        return Ok(format!("key {} ({}, {name}) was already revoked at {}\n", key.id, key.prefix, fmt_time(at)));
    }
    let key = ledger.revoke_key(&key.id).await.map_err(err)?;
    let at = key.revoked_at.map_or_else(String::new, |at| format!(" at {}", fmt_time(at)));
    Ok(format!("revoked key {} ({}, {}){at}\n", key.id, key.prefix, printable(&key.name)))
}

/// The key with this id, or the one key whose visible prefix this is (or starts with).
async fn resolve_key(ledger: &Ledger, id_or_prefix: &str) -> Result<ApiKey, String> {
    let wanted = id_or_prefix.trim();
    if wanted.is_empty() {
        return Err("give a key id or prefix (see imagegate keys list)".into());
    }
    let keys = ledger.list_keys().await.map_err(err)?;
    let exact: Vec<&ApiKey> = keys.iter().filter(|k| k.id == wanted || k.prefix == wanted).collect();
    let found = if exact.is_empty() {
        keys.iter().filter(|k| k.prefix.starts_with(wanted) || k.id.starts_with(wanted)).collect()
    } else {
        exact
    };
    match found.as_slice() {
        [key] => Ok((*key).clone()),
        [] => Err(format!("no key has the id or prefix {wanted:?} (see imagegate keys list)")),
        several => Err(format!(
            "{wanted:?} matches {} keys: {}; give the key id",
            several.len(),
            several
                .iter()
                .map(|k| format!("{} ({}, {})", k.id, k.prefix, printable(&k.name)))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn clean_models(models: Vec<String>) -> Result<Vec<String>, String> {
    let models: Vec<String> = models.iter().map(|m| m.trim().to_owned()).filter(|m| !m.is_empty()).collect();
    if models.is_empty() {
        return Err("--models needs at least one model name (or use --all-models)".into());
    }
    Ok(models)
}

/// `name: value` lines about a key, for create and update (values [`printable`]).
fn describe_key(key: &ApiKey, project: Option<&Project>) -> String {
    let mut lines = vec![
        ("id", key.id.clone()),
        ("name", key.name.clone()),
        ("prefix", key.prefix.clone()),
        ("scope", key.scope.as_str().to_owned()),
        ("project", project.map_or_else(|| "-".to_owned(), |p| format!("{} ({})", p.name, p.id))),
        ("budget", key.budget.as_ref().map_or_else(|| "none".to_owned(), describe_budget)),
        ("models", models_cell(key)),
        ("rate limits", rate_cell(key.rate_limits)),
        ("created", fmt_time(key.created_at)),
    ];
    if let Some(at) = key.revoked_at {
        lines.push(("revoked", fmt_time(at)));
    }
    lines.iter().map(|(name, value)| format!("{:<12} {}\n", format!("{name}:"), printable(value))).collect()
}

/// `$25.00 per month, soft $20.00, 200 images`.
fn describe_budget(budget: &Budget) -> String {
    let per = match budget.period {
        Period::Total => "in total".to_owned(),
        period => format!("per {period}"),
    };
    let mut parts = Vec::new();
    if let Some(limit) = budget.limit_usd {
        parts.push(format!("${}", pricing::format_usd(limit)));
    }
    if let Some(soft) = budget.soft_limit_usd {
        parts.push(format!("soft ${}", pricing::format_usd(soft)));
    }
    if let Some(quota) = budget.image_quota {
        parts.push(format!("{quota} images"));
    }
    format!("{} {per}", parts.join(", "))
}

fn models_cell(key: &ApiKey) -> String {
    match &key.allowed_models {
        None => "all".to_owned(),
        Some(models) if models.is_empty() => "none".to_owned(),
        Some(models) => models.join(","),
    }
}

fn rate_cell(limits: RateLimits) -> String {
    let mut parts = Vec::new();
    if let Some(rpm) = limits.requests_per_minute {
        parts.push(format!("{rpm} requests/min"));
    }
    if let Some(ipm) = limits.images_per_minute {
        parts.push(format!("{ipm} images/min"));
    }
    if parts.is_empty() { "none".to_owned() } else { parts.join(", ") }
}

fn usd(amount: Decimal) -> String {
    format!("${}", pricing::format_usd(amount))
}

/// The budget columns of a table row: BUDGET, SPENT, RESERVED, REMAINING, IMAGES.
fn budget_cells(usage: Option<&BudgetUsage>) -> [String; 5] {
    let Some(u) = usage else { return ["-".into(), "-".into(), "-".into(), "-".into(), "-".into()] };
    let b = &u.budget;
    let mut budget = format!("{}/{}", b.limit_usd.map_or_else(|| "no cap".to_owned(), usd), b.period);
    if let Some(soft) = b.soft_limit_usd {
        budget.push_str(&format!(" (soft {})", usd(soft)));
    }
    let images = match b.image_quota {
        Some(quota) => format!("{}/{quota}", u.images_spent),
        None => u.images_spent.to_string(),
    };
    [budget, usd(u.spent_usd), usd(u.reserved_usd), u.remaining_usd().map_or_else(|| "-".to_owned(), usd), images]
}

fn budget_json(usage: Option<&BudgetUsage>) -> Value {
    let Some(u) = usage else { return Value::Null };
    let b = &u.budget;
    let dec = |d: Option<Decimal>| d.map_or(Value::Null, |d| Value::String(d.normalize().to_string()));
    json!({
        "period": b.period.as_str(),
        "limit_usd": dec(b.limit_usd),
        "soft_limit_usd": dec(b.soft_limit_usd),
        "image_quota": b.image_quota,
        "period_start": rfc3339(u.period_start),
        "resets_at": u.resets_at.map(rfc3339),
        "spent_usd": dec(Some(u.spent_usd)),
        "reserved_usd": dec(Some(u.reserved_usd)),
        "remaining_usd": dec(u.remaining_usd()),
        "images_spent": u.images_spent,
        "images_reserved": u.images_reserved,
        "remaining_images": u.remaining_images(),
    })
}

async fn list(ledger: &Ledger, as_json: bool) -> Result<String, String> {
    let keys = ledger.list_keys().await.map_err(err)?;
    let projects: HashMap<String, String> =
        ledger.list_projects().await.map_err(err)?.into_iter().map(|p| (p.id, p.name)).collect();
    let mut usages = Vec::with_capacity(keys.len());
    for key in &keys {
        usages.push(ledger.key_budget_usage(&key.id).await.map_err(err)?);
    }
    if as_json {
        let items: Vec<Value> = keys
            .iter()
            .zip(&usages)
            .map(|(key, usage)| {
                json!({
                    "id": key.id,
                    "name": key.name,
                    "prefix": key.prefix,
                    "scope": key.scope.as_str(),
                    "project_id": key.project_id,
                    "project": key.project_id.as_ref().and_then(|id| projects.get(id)),
                    "budget": budget_json(usage.as_ref()),
                    "allowed_models": key.allowed_models,
                    "requests_per_minute": key.rate_limits.requests_per_minute,
                    "images_per_minute": key.rate_limits.images_per_minute,
                    "service_tier": key.service_tier.as_deref().unwrap_or("default"),
                    "created_at": rfc3339(key.created_at),
                    "revoked_at": key.revoked_at.map(rfc3339),
                })
            })
            .collect();
        return Ok(format!("{}\n", serde_json::to_string_pretty(&items).map_err(|e| e.to_string())?));
    }
    if keys.is_empty() {
        return Ok("no keys yet: imagegate keys create --name NAME\n".into());
    }
    let mut rows = vec![
        [
            "ID",
            "NAME",
            "PREFIX",
            "SCOPE",
            "PROJECT",
            "BUDGET",
            "SPENT",
            "RESERVED",
            "REMAINING",
            "IMAGES",
            "MODELS",
            "RATE LIMITS",
            "CREATED (UTC)",
            "REVOKED (UTC)",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for (key, usage) in keys.iter().zip(&usages) {
        let project = key
            .project_id
            .as_ref()
            .map_or_else(|| "-".to_owned(), |id| projects.get(id).cloned().unwrap_or_else(|| id.clone()));
        let mut row =
            vec![key.id.clone(), key.name.clone(), key.prefix.clone(), key.scope.as_str().to_owned(), project];
        row.extend(budget_cells(usage.as_ref()));
        row.extend([
            models_cell(key),
            rate_cell(key.rate_limits).replace(" requests/min", " rpm").replace(" images/min", " ipm"),
            fmt_time(key.created_at).trim_end_matches(" UTC").to_owned(),
            key.revoked_at.map_or_else(|| "-".to_owned(), |at| fmt_time(at).trim_end_matches(" UTC").to_owned()),
        ]);
        rows.push(row);
    }
    Ok(table(&rows, |i| (6..=8).contains(&i), None))
}

async fn project_create(ledger: &Ledger, args: ProjectCreateArgs) -> Result<String, String> {
    check_name("--name", &args.name)?;
    let budget = args.budget.apply(None)?;
    let project = ledger.create_project(NewProject { name: args.name, budget }).await.map_err(err)?;
    Ok(describe_project(&project))
}

async fn project_update(ledger: &Ledger, args: ProjectUpdateArgs) -> Result<String, String> {
    if let Some(name) = &args.rename {
        check_name("--rename", name)?;
    }
    let wanted = args.project.or(args.name).unwrap_or_default();
    let project = match ledger.project_by_name(&wanted).await.map_err(err)? {
        Some(project) => project,
        None => ledger.get_project(&wanted).await.map_err(err)?,
    };
    let budget = if args.no_budget { Some(None) } else { args.budget.apply(project.budget.as_ref())?.map(Some) };
    let update = ProjectUpdate { name: args.rename, budget };
    if update == ProjectUpdate::default() {
        return Err("nothing to change: give --rename or a budget flag (--budget-usd, --period, \
                    --soft-budget-usd, --image-quota, --no-budget)"
            .into());
    }
    let project = ledger.update_project(&project.id, update).await.map_err(err)?;
    Ok(format!("updated project {}\n{}", project.id, describe_project(&project)))
}

fn describe_project(project: &Project) -> String {
    let budget = project.budget.as_ref().map_or_else(|| "none".to_owned(), describe_budget);
    format!("id:          {}\nname:        {}\nbudget:      {budget}\n", project.id, printable(&project.name))
}

async fn project_list(ledger: &Ledger, as_json: bool) -> Result<String, String> {
    let projects = ledger.list_projects().await.map_err(err)?;
    let keys = ledger.list_keys().await.map_err(err)?;
    let mut usages = Vec::with_capacity(projects.len());
    for project in &projects {
        usages.push(ledger.project_budget_usage(&project.id).await.map_err(err)?);
    }
    let live_keys = |project: &Project| {
        keys.iter().filter(|k| k.project_id.as_ref() == Some(&project.id) && k.revoked_at.is_none()).count()
    };
    if as_json {
        let items: Vec<Value> = projects
            .iter()
            .zip(&usages)
            .map(|(project, usage)| {
                json!({
                    "id": project.id,
                    "name": project.name,
                    "budget": budget_json(usage.as_ref()),
                    "keys": live_keys(project),
                    "created_at": rfc3339(project.created_at),
                })
            })
            .collect();
        return Ok(format!("{}\n", serde_json::to_string_pretty(&items).map_err(|e| e.to_string())?));
    }
    if projects.is_empty() {
        return Ok("no projects yet: imagegate keys project create --name NAME\n".into());
    }
    let mut rows = vec![
        ["ID", "NAME", "BUDGET", "SPENT", "RESERVED", "REMAINING", "IMAGES", "KEYS", "CREATED (UTC)"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for (project, usage) in projects.iter().zip(&usages) {
        let mut row = vec![project.id.clone(), project.name.clone()];
        row.extend(budget_cells(usage.as_ref()));
        row.push(live_keys(project).to_string());
        row.push(fmt_time(project.created_at).trim_end_matches(" UTC").to_owned());
        rows.push(row);
    }
    Ok(table(&rows, |i| (3..=5).contains(&i) || i == 7, None))
}
