//! Every number of the facts file (shared/facts/openai-images.md, sections 6 to 8) as tables, the token
//! rules, and properties of the cost math.

// Test helpers unwrap freely: a failure here is a failing test, not a user-facing panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use domain::{Quality, Size, Usage};
use pricing::{
    Adjustments, BillingBasis, Catalog, Decimal, JobShape, PlannedRequest, UsageSource, cost, count_text_tokens,
    count_usage, estimate, image_input_tokens, reference_output_tokens, tokens_for_words,
};
use proptest::prelude::*;

fn catalog() -> Catalog {
    Catalog::builtin().unwrap()
}

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

fn size(s: &str) -> Size {
    s.parse().unwrap()
}

fn quality(s: &str) -> Quality {
    s.parse().unwrap()
}

#[test]
fn per_image_prices() {
    #[rustfmt::skip]
    let table = [
        ("gpt-image-1-mini", "low", ["0.005", "0.006", "0.006"]),
        ("gpt-image-1-mini", "medium", ["0.011", "0.015", "0.015"]),
        ("gpt-image-1-mini", "high", ["0.036", "0.052", "0.052"]),
        ("gpt-image-1", "low", ["0.011", "0.016", "0.016"]),
        ("gpt-image-1", "medium", ["0.042", "0.063", "0.063"]),
        ("gpt-image-1", "high", ["0.167", "0.25", "0.25"]),
        ("gpt-image-1.5", "low", ["0.009", "0.013", "0.013"]),
        ("gpt-image-1.5", "medium", ["0.034", "0.05", "0.05"]),
        ("gpt-image-1.5", "high", ["0.133", "0.2", "0.2"]),
    ];
    let c = catalog();
    for (model, q, prices) in table {
        for (s, p) in ["1024x1024", "1024x1536", "1536x1024"].into_iter().zip(prices) {
            assert_eq!(c.model(model).unwrap().per_image_price(quality(q), size(s)), Some(d(p)), "{model} {q} {s}");
        }
    }
    #[rustfmt::skip]
    let dalle = [
        ("dall-e-3", "standard", "1024x1024", "0.04"), ("dall-e-3", "standard", "1792x1024", "0.08"),
        ("dall-e-3", "standard", "1024x1792", "0.08"), ("dall-e-3", "hd", "1024x1024", "0.08"),
        ("dall-e-3", "hd", "1792x1024", "0.12"), ("dall-e-3", "hd", "1024x1792", "0.12"),
        ("dall-e-2", "standard", "256x256", "0.016"), ("dall-e-2", "standard", "512x512", "0.018"),
        ("dall-e-2", "standard", "1024x1024", "0.02"),
    ];
    for (model, q, s, p) in dalle {
        let m = c.model(model).unwrap();
        assert_eq!(m.billing_basis, BillingBasis::PerImage);
        assert_eq!(m.per_image_price(quality(q), size(s)), Some(d(p)), "{model} {q} {s}");
    }
}

#[test]
fn token_prices() {
    #[rustfmt::skip]
    let table = [
        ("gpt-image-1-mini", ["2.00", "0.20", "2.50", "0.25", "8.00"]),
        ("gpt-image-1", ["5.00", "1.25", "10.00", "2.50", "40.00"]),
        ("gpt-image-1.5", ["5.00", "1.25", "8.00", "2.00", "32.00"]),
        ("gpt-image-1.5-2025-12-16", ["5.00", "1.25", "8.00", "2.00", "32.00"]),
        ("gpt-image-2", ["5.00", "1.25", "8.00", "2.00", "30.00"]),
        ("gpt-image-2-2026-04-21", ["5.00", "1.25", "8.00", "2.00", "30.00"]),
    ];
    let c = catalog();
    for (model, p) in table {
        let m = c.model(model).unwrap();
        assert_eq!(m.billing_basis, BillingBasis::Tokens, "{model} bills from usage tokens");
        let t = m.tokens.as_ref().unwrap();
        let got = [
            t.text_input.0,
            t.cached_text_input.unwrap().0,
            t.image_input.0,
            t.cached_image_input.unwrap().0,
            t.image_output.0,
        ];
        assert_eq!(got, p.map(d), "{model}");
        assert!(m.as_of.is_some() && m.source.is_some(), "{model} says where its prices come from");
    }
}

#[test]
fn output_token_table() {
    #[rustfmt::skip]
    let table = [("low", [272, 408, 400]), ("medium", [1056, 1584, 1568]), ("high", [4160, 6240, 6208])];
    let c = catalog();
    for model in ["gpt-image-1-mini", "gpt-image-1", "gpt-image-1.5"] {
        for (q, tokens) in table {
            for (s, t) in ["1024x1024", "1024x1536", "1536x1024"].into_iter().zip(tokens) {
                assert_eq!(
                    c.model(model).unwrap().output_tokens_per_image(quality(q), size(s)),
                    Some(t),
                    "{model} {q} {s}"
                );
            }
        }
    }
}

/// gpt-image-2 takes any size: its output tokens come from OpenAI's calculator formula, which must give
/// the calculator's own default (196), a live API usage (13,342 at 3840x2160 high), a measured
/// 2048x1152 run, and, at $30 per 1M, the per-image prices quoted from OpenAI's pricing page.
#[test]
fn gpt_image_2_output_tokens_for_any_size() {
    #[rustfmt::skip]
    let table = [
        ("1024x1024", [196, 1756, 7024]),
        ("1024x1536", [158, 1372, 5488]),
        ("1536x1024", [158, 1372, 5488]),
        ("2048x1152", [157, 1413, 5650]),
        ("3840x2160", [371, 3336, 13342]),
    ];
    let c = catalog();
    for model in ["gpt-image-2", "gpt-image-2-2026-04-21"] {
        let m = c.model(model).unwrap();
        for (s, tokens) in table {
            for (q, t) in ["low", "medium", "high"].into_iter().zip(tokens) {
                assert_eq!(m.output_tokens_per_image(quality(q), size(s)), Some(t), "{model} {q} {s}");
            }
        }
        assert!(m.output_token_formula.as_ref().unwrap().source.is_some());
    }
    // The per-image prices quoted from OpenAI's page, to the tenth of a cent.
    let m = c.model("gpt-image-2").unwrap();
    let out = m.tokens.as_ref().unwrap().image_output.0;
    for (s, prices) in [("1024x1024", ["0.006", "0.053", "0.211"]), ("1024x1536", ["0.005", "0.041", "0.165"])] {
        for (q, p) in ["low", "medium", "high"].into_iter().zip(prices) {
            let tokens = m.output_tokens_per_image(quality(q), size(s)).unwrap();
            let usd = (Decimal::from(tokens) * out / Decimal::from(1_000_000)).round_dp(3);
            assert_eq!(usd, d(p), "{q} {s}");
        }
    }
    // `largest_size` is the most tokens of every size gpt-image-2 takes: what `auto` is held at.
    let formula = m.output_token_formula.as_ref().unwrap();
    let largest = formula.largest_size().unwrap();
    for q in ["low", "medium", "high"] {
        let most = formula.tokens(quality(q), largest).unwrap();
        for w in (16..=3840).step_by(16) {
            for h in (16..=3840).step_by(16) {
                if domain::gpt_image_2::size_problem(w, h).is_none() {
                    let t = formula.tokens(quality(q), Size::new(w, h)).unwrap();
                    assert!(t <= most, "{q} {w}x{h}: {t} > {most} at {largest}");
                }
            }
        }
    }
    assert_eq!(pricing::worst_case(m, None, None), Some((Quality::High, largest)));
    assert_eq!(
        pricing::worst_case(m, Some(Quality::Low), Some(size("2048x1152"))),
        Some((Quality::Low, size("2048x1152")))
    );
}

/// Every model OpenAI has shut down says so, with the day, the replacements OpenAI names and a source.
#[test]
fn lifecycles_of_openai_models() {
    let c = catalog();
    let day = |s: &str| chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
    #[rustfmt::skip]
    let table = [
        ("gpt-image-1-mini", "2026-12-01", "gpt-image-2.6-sunburst"),
        ("gpt-image-1.5", "2026-12-01", "gpt-image-2.6-sunburst"),
        ("gpt-image-1.5-2025-12-16", "2026-12-01", "gpt-image-2.6-sunburst"),
        ("chatgpt-image-latest", "2026-12-01", "gpt-image-2.6-sunburst"),
        ("gpt-image-1", "2026-10-23", "gpt-image-2.5-sunburst"),
        ("dall-e-3", "2026-05-12", "gpt-image-2.5-sunburst"),
        ("dall-e-2", "2026-05-12", "gpt-image-2.5-sunburst"),
    ];
    for (model, date, first) in table {
        let l = c.lifecycle(model).unwrap();
        assert_eq!(l.shutdown_date, Some(day(date)), "{model}");
        assert_eq!(l.replacements.first().map(String::as_str), Some(first), "{model}");
        assert!(l.is_shut_down(day("2026-12-06")) && !l.is_shut_down(day(date).pred_opt().unwrap()), "{model}");
        assert!(!l.source.is_empty());
    }
    assert_eq!(c.lifecycle("gpt-image-2").unwrap().shutdown_date, None);
    let bad = Catalog::from_toml(
        &pricing::BUILTIN_CATALOG.replace("shutdown_date = \"2026-12-01\"", "shutdown_date = \"1 Dec 2026\""),
    );
    assert!(bad.unwrap_err().0.contains("YYYY-MM-DD"));
}

#[test]
fn local_models_report_usage_on_the_gpt_image_scale_by_area() {
    let c = catalog();
    let table = c.model("gpt-image-1").unwrap();
    for q in ["low", "medium", "high"] {
        for s in ["1024x1024", "1024x1536", "1536x1024"] {
            let listed = table.output_tokens_per_image(quality(q), size(s)).unwrap();
            let reference = reference_output_tokens(quality(q), size(s)).unwrap();
            // Equal where the table is proportional to the area; within 2% where it is not (landscape).
            assert!(reference.abs_diff(listed) * 50 <= listed, "{q} {s}: {reference} vs {listed}");
        }
    }
    assert_eq!(reference_output_tokens(quality("low"), size("512x512")), Some(68));
    assert_eq!(reference_output_tokens(quality("medium"), size("96x64")), Some(7));
}

#[test]
fn the_token_table_reproduces_published_prices_where_the_facts_say_it_does() {
    // gpt-image-1 at $40/M: 4160 tokens -> $0.1664 (published $0.167); gpt-image-1.5 at $32/M -> $0.13312.
    let c = catalog();
    let per_image = |model: &str| {
        let job = JobShape { text_tokens: 0, ..job(1, "high", "1024x1024") };
        cost(model, c.model(model).unwrap(), &job, None, None, &Adjustments::none("openai")).unwrap().total
    };
    assert_eq!(per_image("gpt-image-1"), d("0.1664"));
    assert_eq!(per_image("gpt-image-1.5"), d("0.13312"));
    // And does not for mini: 272 low tokens at $8/M is $0.002176, not the published $0.005.
    let job = JobShape { text_tokens: 0, ..job(1, "low", "1024x1024") };
    let m = c.model("gpt-image-1-mini").unwrap();
    assert_eq!(
        cost("gpt-image-1-mini", m, &job, None, None, &Adjustments::none("openai")).unwrap().total,
        d("0.002176")
    );
}

#[test]
fn image_input_tile_rule() {
    #[rustfmt::skip]
    let table = [
        ("1024x1024", false, 194), ("512x512", false, 194), ("256x256", false, 194),
        ("1536x1024", false, 65 + 129 * 2), ("1024x1536", false, 65 + 129 * 2),
        ("4096x4096", false, 194), ("4096x2048", false, 65 + 129 * 2), ("300x1000", false, 65 + 129 * 2),
        ("2048x512", false, 65 + 129 * 4), ("1024x1024", true, 194 + 4160), ("1536x1024", true, 65 + 129 * 2 + 6240),
    ];
    for (s, high, want) in table {
        assert_eq!(image_input_tokens(size(s), high), want, "{s} high={high}");
    }
}

fn job(n: u64, q: &str, s: &str) -> JobShape {
    JobShape {
        n,
        quality: quality(q),
        size: size(s),
        partial_images: 0,
        text_tokens: 40,
        input_images: vec![],
        input_fidelity_high: false,
    }
}

#[test]
fn counted_usage_includes_partial_images_and_inputs() {
    let c = catalog();
    let m = c.model("gpt-image-1").unwrap();
    let mut j = job(2, "medium", "1024x1024");
    j.partial_images = 3;
    j.input_images = vec![size("1024x1024"), size("1536x1024")];
    let u = count_usage(m, &j).unwrap().unwrap();
    assert_eq!(u.output_tokens, 2 * (1056 + 300));
    assert_eq!(u.input_image_tokens, 194 + 323);
    assert_eq!(u.input_tokens, 40 + 194 + 323);
    assert_eq!(u.total_tokens, u.input_tokens + u.output_tokens);
}

#[test]
fn reported_usage_is_the_billing_truth() {
    let c = catalog();
    let m = c.model("gpt-image-1-mini").unwrap();
    let reported = Usage {
        input_tokens: 50,
        output_tokens: 1000,
        total_tokens: 1050,
        input_text_tokens: 10,
        input_image_tokens: 40,
        output_image_tokens: None,
        output_text_tokens: None,
    };
    let c =
        cost("gpt-image-1-mini", m, &job(1, "high", "1024x1024"), Some(reported), None, &Adjustments::none("openai"))
            .unwrap();
    assert_eq!(c.usage, Some(reported));
    assert_eq!(c.usage_source, UsageSource::Provider);
    // 10 x $2/M + 40 x $2.5/M + 1000 x $8/M
    assert_eq!(c.total, d("0.00002") + d("0.0001") + d("0.008"));
}

#[test]
fn tier_and_provider_adjustments() {
    let c = catalog();
    let m = c.model("gpt-image-1").unwrap();
    let list =
        cost("gpt-image-1", m, &job(1, "high", "1024x1024"), None, None, &Adjustments::none("openai")).unwrap().total;
    let table = [
        ("default", "1", "0", d("1")),
        ("flex", "0.5", "0", d("0.5")),
        ("batch", "0.5", "20", d("0.4")),
        ("default", "1", "20", d("0.8")),
        ("default", "1", "-10", d("1.1")),
    ];
    for (tier, multiplier, discount, factor) in table {
        let adj = Adjustments {
            tier: tier.into(),
            tier_multiplier: d(multiplier),
            provider: "comet".into(),
            discount_percent: d(discount),
        };
        assert_eq!(c.tier_multiplier(tier), Some(d(if tier == "default" { "1" } else { "0.5" })));
        let got = cost("gpt-image-1", m, &job(1, "high", "1024x1024"), None, None, &adj).unwrap();
        assert_eq!(got.total, list * factor, "{tier} {discount}");
        assert_eq!(got.lines.iter().map(|l| l.amount).sum::<Decimal>(), got.total);
    }
}

#[test]
fn o200k_token_counts() {
    assert_eq!(count_text_tokens(""), 0);
    assert_eq!(count_text_tokens("hello world"), 2);
    assert_eq!(count_text_tokens("Hello, world!"), 4);
    assert!(count_text_tokens(&"otter ".repeat(1000)) >= 1000);
    assert_eq!(tokens_for_words(30), Ok(40));
}

#[test]
fn the_published_campaign() {
    // 100 images, medium, 1024x1024, 30-word prompts (~40 tokens each), on gpt-image-1-mini.
    let c = catalog();
    let plan = PlannedRequest {
        quality: Quality::Medium,
        size: size("1024x1024"),
        n: 1,
        requests: 100,
        prompt_tokens: tokens_for_words(30).unwrap(),
        input_images: vec![],
        input_fidelity_high: false,
        partial_images: 0,
    };
    let e = estimate("gpt-image-1-mini", c.model("gpt-image-1-mini").unwrap(), &plan, &Adjustments::none("openai"))
        .unwrap();
    let lines: Vec<(&str, u64, Decimal)> =
        e.cost.lines.iter().map(|l| (l.item.as_str(), l.quantity, l.amount)).collect();
    assert_eq!(lines, [("text input tokens", 4_000, d("0.008")), ("image output tokens", 105_600, d("0.8448"))]);
    assert_eq!(e.cost.total, d("0.8528"));
    let v = e.per_image_view.unwrap();
    assert_eq!(v.per_image_total, d("1.10"));
    assert_eq!(v.input_tokens_cost, d("0.008"));
    assert_eq!(v.output_tokens_cost, d("0.8448"));
    assert_eq!(v.naive_sum, d("1.9528"));
    assert_eq!(v.per_image_plus_input, d("1.108"));
    // The blog rounds the output line to $0.84 and adds the three: $1.948.
    assert_eq!(v.per_image_total + v.input_tokens_cost + v.output_tokens_cost.round_dp(2), d("1.948"));
}

#[test]
fn config_overrides_and_bad_entries() {
    let over: toml::Table = toml::from_str(
        r#"
        [flux]
        billing_basis = "flat"
        flat_per_image = "0.003"
        [bad]
        billing_basis = "tokens"
        "#,
    )
    .unwrap();
    let mut models = std::collections::BTreeMap::new();
    models.insert("flux".to_owned(), over["flux"].clone().try_into().unwrap());
    let c = catalog().with_overrides(models, Default::default()).unwrap();
    assert_eq!(c.model("flux").unwrap().flat_per_image.unwrap().0, d("0.003"));
    let mut bad = std::collections::BTreeMap::new();
    bad.insert("bad".to_owned(), over["bad"].clone().try_into().unwrap());
    let e = catalog().with_overrides(bad, Default::default()).unwrap_err();
    assert!(e.0.contains("prices.\"bad\"") && e.0.contains("[tokens]"), "{e}");
    let float: Result<pricing::ModelPrice, _> = toml::from_str("billing_basis = \"flat\"\nflat_per_image = 0.1");
    assert!(float.unwrap_err().to_string().contains("strings"));
}

#[test]
fn compute_time_is_priced_and_rounded_once() {
    assert_eq!(pricing::compute_cost(d("1.50"), 3_600_000), Ok(d("1.5")));
    assert_eq!(pricing::compute_cost(d("0.10"), 1_000), Ok(d("0.000027778")));
    assert!(catalog().local.cpu_usd_per_hour.0 > Decimal::ZERO, "local cost is visible, not zero");
}

const QUALITIES: [&str; 3] = ["low", "medium", "high"];

proptest! {
    #[test]
    fn cost_is_monotonic_and_lines_sum_to_the_total(
        model in prop::sample::select(vec!["gpt-image-1-mini", "gpt-image-1", "gpt-image-1.5"]),
        n in 1u64..10,
        q in 0usize..2,
        wide in any::<bool>(),
        text in 0u64..5000,
        discount in -50i64..99,
        flex in any::<bool>(),
    ) {
        let c = catalog();
        let m = c.model(model).unwrap();
        let adj = Adjustments {
            tier: if flex { "flex" } else { "default" }.into(),
            tier_multiplier: if flex { d("0.5") } else { Decimal::ONE },
            provider: "p".into(),
            discount_percent: Decimal::from(discount),
        };
        let other = if wide { "1536x1024" } else { "1024x1536" };
        let price = |n: u64, q: &str, s: &str| {
            let mut j = job(n, q, s);
            j.text_tokens = text;
            let c = cost(model, m, &j, None, None, &adj).unwrap();
            prop_assert_eq!(c.lines.iter().map(|l| l.amount).sum::<Decimal>(), c.total);
            Ok(c.total)
        };
        let base = price(n, QUALITIES[q], "1024x1024")?;
        prop_assert!(price(n + 1, QUALITIES[q], "1024x1024")? > base);
        prop_assert!(price(n, QUALITIES[q + 1], "1024x1024")? > base);
        prop_assert!(price(n, QUALITIES[q], other)? > base);
        prop_assert!(base > Decimal::ZERO);
    }
}
