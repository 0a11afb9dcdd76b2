//! Model routing: a model name in a request (`gpt-image-1-mini`, `comet/gpt-image-1-mini`, an alias)
//! to the provider that serves it and that provider's name for it.

use std::collections::BTreeMap;
use std::sync::Arc;

use api::ApiError;
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
}

impl Catalog {
    /// `providers` pairs each provider with the models it serves; alias targets are checked here.
    pub fn new(providers: Vec<ProviderModels>, aliases: BTreeMap<String, String>) -> Result<Catalog, ConfigError> {
        let mut catalog =
            Catalog { providers: Vec::new(), discounts: Vec::new(), entries: Vec::new(), aliases: BTreeMap::new() };
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
        Ok(catalog)
    }

    pub fn resolve(&self, name: &str) -> Result<Route, ApiError> {
        let target = self.aliases.get(name).map(String::as_str).unwrap_or(name);
        let entry = self.find(target).ok_or_else(|| ApiError::model_not_found(name, &self.public_names()))?;
        Ok(self.route_of(entry))
    }

    fn route_of(&self, entry: &Entry) -> Route {
        Route {
            provider: Arc::clone(&self.providers[entry.provider]),
            upstream_model: entry.model.clone(),
            family: entry.family,
            discount_percent: self.discounts[entry.provider],
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

    /// Every name a request may use: bare model names, `provider/model`, and aliases.
    pub fn public_names(&self) -> Vec<String> {
        self.listing().into_iter().map(|(id, _)| id).collect()
    }

    /// `(id, owned_by)` for `GET /v1/models`.
    pub fn listing(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for e in &self.entries {
            let owner = self.providers[e.provider].name().to_owned();
            if !out.iter().any(|(id, _)| *id == e.model) {
                out.push((e.model.clone(), owner.clone()));
            }
            out.push((format!("{owner}/{}", e.model), owner));
        }
        for (alias, target) in &self.aliases {
            if let Some(e) = self.find(target) {
                out.push((alias.clone(), self.providers[e.provider].name().to_owned()));
            }
        }
        out
    }
}
