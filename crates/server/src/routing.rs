//! Model routing: a model name in a request (`gpt-image-1-mini`, `comet/gpt-image-1-mini`, an alias)
//! to the provider that serves it and that provider's name for it.
//!
//! Models have lives: one its provider has shut down (the price catalog's `[lifecycle]`) is served by
//! its replacement (the config's `[replacements]`, else the first local model, turbo profile first),
//! or refused with a message that says when it was shut down, what OpenAI names instead and how to
//! configure a replacement. A model still listed on a provider goes there, and the provider's own
//! "model not found" leads to the same replacement or refusal.

use std::collections::BTreeMap;
use std::sync::Arc;

use api::ApiError;
use chrono::NaiveDate;
use domain::ModelFamily;
use providers::Provider;
use rust_decimal::Decimal;

use crate::config::ConfigError;

/// Where a request goes.
#[derive(Clone)]
pub struct Route {
    pub provider: Arc<dyn Provider>,
    /// The provider's own name for the model.
    pub upstream_model: String,
    pub family: ModelFamily,
    pub discount_percent: Decimal,
    /// The model the client named, when this route serves a replacement for it.
    pub replaces: Option<String>,
    /// Where the request goes instead when the provider answers that the model does not exist (with
    /// none, the client is told of the model's shutdown: [`Catalog::shut_down_refusal`]).
    pub fallback: Option<Box<Route>>,
    /// The tier the request runs and is billed at ([`crate::jobs::execute`] sets it; `Default` until).
    pub tier: domain::Tier,
}

impl Route {
    /// `MODEL@PROVIDER`: what ran (the `x-imagegate-served-by` header).
    pub fn served_by(&self) -> String {
        format!("{}@{}", self.upstream_model, self.provider.name())
    }

    /// The model's name in messages: the client's, and what serves it when that is a replacement.
    pub fn display_name(&self, asked: &str) -> String {
        match &self.replaces {
            Some(_) => format!("{} (serving '{asked}' here, which its provider shut down)", self.upstream_model),
            None => asked.to_owned(),
        }
    }
}

/// What a model shut down by its provider becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replacement {
    /// Served by this model (a name the catalog resolves).
    Model(String),
    /// Refused, with the shutdown message, even where a local model could serve it.
    Refuse,
}

/// Models' lives and what replaces them.
#[derive(Debug, Clone, Default)]
pub struct Lifecycles {
    /// The price catalog's `[lifecycle]` entries, by model.
    pub known: BTreeMap<String, pricing::Lifecycle>,
    /// The config's `[replacements]`.
    pub replacements: BTreeMap<String, Replacement>,
    /// The local model that serves shut-down models without a configured replacement.
    pub default_local: Option<String>,
}

impl Lifecycles {
    /// The name of what serves `model` in its place on `today`: the configured replacement, or for a
    /// model shut down without one, the default local model; `None`: it is refused.
    pub fn replacement(&self, model: &str, today: NaiveDate) -> Option<&str> {
        match self.replacements.get(model) {
            Some(Replacement::Refuse) => None,
            Some(Replacement::Model(m)) => Some(m),
            None if self.known.get(model).is_some_and(|l| l.is_shut_down(today)) => self.default_local.as_deref(),
            None => None,
        }
    }
}

/// One row of `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: String,
    pub owned_by: String,
    pub shutdown_date: Option<NaiveDate>,
}

/// Today, for shutdown dates (UTC).
pub fn today() -> NaiveDate {
    chrono::Utc::now().date_naive()
}

/// A provider, the models it serves (its name for each, and the family), and its price adjustment.
pub struct ProviderModels {
    pub provider: Arc<dyn Provider>,
    pub models: Vec<(String, ModelFamily)>,
    /// Percent off the list price (negative: a markup).
    pub discount_percent: Decimal,
}

struct Entry {
    provider: usize,
    model: String,
    family: ModelFamily,
}

/// Every model this instance serves. Bare names go to the first provider listing them, in config order.
pub struct Catalog {
    providers: Vec<Arc<dyn Provider>>,
    discounts: Vec<Decimal>,
    entries: Vec<Entry>,
    aliases: BTreeMap<String, String>,
    lifecycles: Lifecycles,
}

impl Catalog {
    /// `providers` pairs each provider with the models it serves; alias targets are checked here.
    pub fn new(providers: Vec<ProviderModels>, aliases: BTreeMap<String, String>) -> Result<Catalog, ConfigError> {
        Catalog::with_lifecycles(providers, aliases, Lifecycles::default())
    }

    /// As [`Catalog::new`], with models' lives and replacements (their targets are checked here).
    pub fn with_lifecycles(
        providers: Vec<ProviderModels>,
        aliases: BTreeMap<String, String>,
        lifecycles: Lifecycles,
    ) -> Result<Catalog, ConfigError> {
        let mut catalog = Catalog {
            providers: Vec::new(),
            discounts: Vec::new(),
            entries: Vec::new(),
            aliases: BTreeMap::new(),
            lifecycles: Lifecycles::default(),
        };
        for (i, p) in providers.into_iter().enumerate() {
            for (model, family) in p.models {
                catalog.entries.push(Entry { provider: i, model, family });
            }
            catalog.providers.push(p.provider);
            catalog.discounts.push(p.discount_percent);
        }
        for (alias, target) in &aliases {
            if catalog.find(target).is_none() {
                return Err(ConfigError(format!(
                    "aliases.{alias}: the target '{target}' is not a model any provider serves (served: {})",
                    catalog.model_names().join(", ")
                )));
            }
        }
        catalog.aliases = aliases;
        for (model, replacement) in &lifecycles.replacements {
            let Replacement::Model(target) = replacement else { continue };
            match catalog.find(target) {
                None => {
                    return Err(ConfigError(format!(
                        "replacements.\"{model}\": the target '{target}' is not a model any provider serves (served: {}; or write \"refuse\")",
                        catalog.model_names().join(", ")
                    )));
                }
                Some(e) if e.model == *model => {
                    return Err(ConfigError(format!(
                        "replacements.\"{model}\": a model cannot replace itself; name another model, or \"refuse\""
                    )));
                }
                Some(_) => {}
            }
        }
        catalog.lifecycles = lifecycles;
        Ok(catalog)
    }

    /// The route of a request for `name`, on `today` (for shutdown dates).
    pub fn resolve(&self, name: &str) -> Result<Route, ApiError> {
        self.resolve_on(name, today())
    }

    pub fn resolve_on(&self, name: &str, today: NaiveDate) -> Result<Route, ApiError> {
        let target = self.aliases.get(name).map(String::as_str).unwrap_or(name);
        let model = target.split_once('/').map_or(target, |(_, m)| m);
        if let Some(entry) = self.find(target) {
            let mut route = self.route_of(entry);
            // Listed on a provider: it goes there; that provider's "no such model" leads on.
            if self.has_life(model) {
                route.fallback = self.replacement_of(model, today).map(Box::new);
            }
            return Ok(route);
        }
        if self.replaced_here(model, today) {
            return match self.replacement_of(model, today) {
                Some(r) => Ok(Route { replaces: Some(name.to_owned()), ..r }),
                None => Err(self.shut_down_error(model, today)),
            };
        }
        Err(ApiError::model_not_found(name, &self.public_names()))
    }

    /// Whether the model has a shutdown date or a configured replacement.
    fn has_life(&self, model: &str) -> bool {
        self.lifecycles.known.get(model).is_some_and(|l| l.shutdown_date.is_some())
            || self.lifecycles.replacements.contains_key(model)
    }

    fn is_shut_down(&self, model: &str, today: NaiveDate) -> bool {
        self.lifecycles.known.get(model).is_some_and(|l| l.is_shut_down(today))
    }

    /// Whether a request for `model`, when no provider here lists it, goes to a replacement or to the
    /// shutdown refusal (rather than to "no such model").
    fn replaced_here(&self, model: &str, today: NaiveDate) -> bool {
        self.is_shut_down(model, today) || self.lifecycles.replacements.contains_key(model)
    }

    /// What a client is told when the provider of `model` answers that it does not exist and no
    /// replacement serves it: its shutdown, said plainly; `None` for a model without a known life.
    pub fn shut_down_refusal(&self, model: &str) -> Option<ApiError> {
        self.has_life(model).then(|| self.shut_down_error(model, today()))
    }

    /// The route that serves `model` in its place: the configured replacement, or for a model shut
    /// down without one, the default local model.
    fn replacement_of(&self, model: &str, today: NaiveDate) -> Option<Route> {
        let target = self.lifecycles.replacement(model, today)?;
        self.find(target).map(|e| Route { replaces: Some(model.to_owned()), ..self.route_of(e) })
    }

    /// The refusal for a model its provider no longer serves: when, what instead, how to configure it.
    fn shut_down_error(&self, model: &str, today: NaiveDate) -> ApiError {
        let life = self.lifecycles.known.get(model);
        let when = match life.and_then(|l| l.shutdown_date) {
            Some(d) if d <= today => format!("was shut down by its provider on {d}"),
            Some(d) => format!("is to be shut down by its provider on {d}, and its provider no longer serves it"),
            None => "is no longer served by its provider".to_owned(),
        };
        let named = match life.map(|l| l.replacements.as_slice()).unwrap_or_default() {
            [] => String::new(),
            names => format!(" OpenAI names {} instead.", names.join(" or ")),
        };
        let here = match self.lifecycles.replacements.get(model) {
            Some(Replacement::Refuse) => {
                "This server's operator chose to refuse it rather than serve it with another model".to_owned()
            }
            _ => format!(
                "This server has no replacement for it: use another model, or ask the server's operator to name one under [replacements] in its config (\"{model}\" = \"MODEL\") or to install a local model (`imagegate models pull sd-turbo`)"
            ),
        };
        let message =
            format!("The model '{model}' {when}.{named} {here}. Models here: {}.", self.public_names().join(", "));
        ApiError::new(404, "invalid_request_error", Some("model"), Some("model_not_found"), message)
    }

    fn route_of(&self, entry: &Entry) -> Route {
        Route {
            provider: Arc::clone(&self.providers[entry.provider]),
            upstream_model: entry.model.clone(),
            family: entry.family,
            discount_percent: self.discounts[entry.provider],
            replaces: None,
            fallback: None,
            tier: domain::Tier::Default,
        }
    }

    /// Every (provider, model) route, in config order.
    pub fn routes(&self) -> Vec<Route> {
        self.entries.iter().map(|e| self.route_of(e)).collect()
    }

    fn find(&self, name: &str) -> Option<&Entry> {
        match name.split_once('/') {
            Some((provider, model)) => {
                self.entries.iter().find(|e| e.model == model && self.providers[e.provider].name() == provider)
            }
            None => self.entries.iter().find(|e| e.model == name),
        }
    }

    fn model_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for e in &self.entries {
            if !names.contains(&e.model) {
                names.push(e.model.clone());
            }
        }
        names
    }

    /// Every name a request may use: bare model names, `provider/model`, aliases and replaced models.
    pub fn public_names(&self) -> Vec<String> {
        self.listing_on(today()).into_iter().map(|l| l.id).collect()
    }

    /// `GET /v1/models`: every name a request may use, with its owner (the provider that runs it) and
    /// its shutdown date where its provider announced one.
    pub fn listing(&self) -> Vec<Listed> {
        self.listing_on(today())
    }

    pub fn listing_on(&self, today: NaiveDate) -> Vec<Listed> {
        let date = |model: &str| self.lifecycles.known.get(model).and_then(|l| l.shutdown_date);
        let mut out: Vec<Listed> = Vec::new();
        for e in &self.entries {
            let owner = self.providers[e.provider].name().to_owned();
            let shutdown_date = date(&e.model);
            if !out.iter().any(|l| l.id == e.model) {
                out.push(Listed { id: e.model.clone(), owned_by: owner.clone(), shutdown_date });
            }
            out.push(Listed { id: format!("{owner}/{}", e.model), owned_by: owner, shutdown_date });
        }
        for (alias, target) in &self.aliases {
            if let Some(e) = self.find(target) {
                let owned_by = self.providers[e.provider].name().to_owned();
                out.push(Listed { id: alias.clone(), owned_by, shutdown_date: date(&e.model) });
            }
        }
        // Shut-down models served here by a replacement answer requests: they are listed, with their date.
        let mut replaced: Vec<&String> = self.lifecycles.known.keys().collect();
        replaced.extend(self.lifecycles.replacements.keys());
        for model in replaced {
            if out.iter().any(|l| l.id == *model) || !self.replaced_here(model, today) {
                continue;
            }
            if let Some(r) = self.replacement_of(model, today) {
                out.push(Listed {
                    id: model.clone(),
                    owned_by: r.provider.name().to_owned(),
                    shutdown_date: date(model),
                });
            }
        }
        out
    }
}
