//! Estimates over the whole range the estimate's inputs allow ([`pricing::limits`]), maxima included:
//! exact (a plan of `count` requests is `count` x one request's price, to the last digit), monotonic in
//! the count and the prompt's length, and refused with a `PriceError`, never wrapped, beyond (issue 17).

// Test helpers unwrap freely: a failure here is a failing test, not a user-facing panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use domain::{Quality, Size};
use pricing::limits::{
    MAX_IMAGE_SIDE, MAX_IMAGES_PER_REQUEST, MAX_INPUT_IMAGES, MAX_PARTIAL_IMAGES, MAX_PROMPT_TOKENS, MAX_PROMPT_WORDS,
    MAX_REQUESTS,
};
use pricing::{Adjustments, Catalog, Decimal, Estimate, ModelPrice, PlannedRequest, estimate, tokens_for_words};
use proptest::prelude::*;

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

/// The built-in catalog plus a flat-priced model, which prices any size (its usage by area).
fn catalog() -> Catalog {
    let mut c = Catalog::builtin().unwrap();
    let flat: ModelPrice = toml::from_str("billing_basis = \"flat\"\nflat_per_image = \"0.003\"").unwrap();
    c.models.insert("flat".to_owned(), flat);
    c
}

/// Every (model, quality, size) the catalog prices, and for the flat model the largest size allowed.
fn priced() -> Vec<(String, Quality, Size)> {
    let c = catalog();
    let mut out = Vec::new();
    for (model, price) in &c.models {
        let table: Vec<(&String, &String)> = if price.output_tokens.is_empty() {
            price.per_image.iter().flat_map(|(q, sizes)| sizes.keys().map(move |s| (q, s))).collect()
        } else {
            price.output_tokens.iter().flat_map(|(q, sizes)| sizes.keys().map(move |s| (q, s))).collect()
        };
        for (q, s) in table {
            out.push((model.clone(), q.parse().unwrap(), s.parse().unwrap()));
        }
    }
    for q in [Quality::Low, Quality::High] {
        out.push(("flat".to_owned(), q, Size::new(MAX_IMAGE_SIDE, MAX_IMAGE_SIDE)));
        out.push(("flat".to_owned(), q, Size::new(1, 1)));
    }
    out
}

fn plan(quality: Quality, size: Size, requests: u64, prompt_tokens: u64) -> PlannedRequest {
    PlannedRequest {
        quality,
        size,
        n: 1,
        requests,
        prompt_tokens,
        input_images: vec![],
        input_fidelity_high: false,
        partial_images: 0,
    }
}

fn run(model: &str, plan: &PlannedRequest, adjustments: &Adjustments) -> Result<Estimate, pricing::PriceError> {
    let c = catalog();
    estimate(model, c.model(model).unwrap(), plan, adjustments)
}

/// The largest plan the limits allow: every count at its maximum, the largest-token input images.
fn largest(quality: Quality, size: Size) -> PlannedRequest {
    PlannedRequest {
        n: MAX_IMAGES_PER_REQUEST,
        // 2048x512 is 4 tiles after scaling, the most any input image counts; high fidelity adds the
        // larger (non-square) surcharge.
        input_images: vec![Size::new(2048, 512); MAX_INPUT_IMAGES],
        input_fidelity_high: true,
        partial_images: MAX_PARTIAL_IMAGES,
        ..plan(quality, size, MAX_REQUESTS, MAX_PROMPT_TOKENS)
    }
}

/// `k` x an estimate, line by line: what `k` times as many requests must cost.
fn assert_scaled(many: &Estimate, one: &Estimate, k: u64) {
    let k_dec = Decimal::from(k);
    assert_eq!(many.cost.total, one.cost.total * k_dec, "total of {k} requests");
    assert_eq!(many.cost.lines.len(), one.cost.lines.len());
    for (m, o) in many.cost.lines.iter().zip(&one.cost.lines) {
        assert_eq!(m.item, o.item);
        assert_eq!(m.amount, o.amount * k_dec, "{}", m.item);
    }
    assert_eq!(many.cost.lines.iter().map(|l| l.amount).sum::<Decimal>(), many.cost.total);
    match (&many.per_image_view, &one.per_image_view) {
        (Some(m), Some(o)) => {
            assert_eq!(m.per_image_total, o.per_image_total * k_dec);
            assert_eq!(m.input_tokens_cost, o.input_tokens_cost * k_dec);
            assert_eq!(m.output_tokens_cost, o.output_tokens_cost * k_dec);
        }
        (None, None) => {}
        _ => panic!("per-image view on one side only"),
    }
}

#[test]
fn the_largest_plan_is_priced_exactly_on_every_model_quality_and_size() {
    let c = catalog();
    for (model, quality, size) in priced() {
        for tier in c.tiers.keys() {
            let adjustments = Adjustments {
                tier: tier.clone(),
                tier_multiplier: c.tier_multiplier(tier).unwrap(),
                provider: "p".into(),
                discount_percent: d("-12.5"),
            };
            let many = largest(quality, size);
            let one = PlannedRequest { requests: 1, ..many.clone() };
            let e_many = run(&model, &many, &adjustments).unwrap_or_else(|e| panic!("{model} {quality} {size}: {e}"));
            let e_one = run(&model, &one, &adjustments).unwrap();
            assert_scaled(&e_many, &e_one, MAX_REQUESTS);
            assert!(e_many.cost.total > Decimal::ZERO, "{model} {quality} {size}");
        }
    }
}

#[test]
fn the_issue_17_inputs_are_refused_not_wrapped() {
    let mini = "gpt-image-1-mini";
    let adj = Adjustments::none("openai");
    let medium = |requests, tokens| plan(Quality::Medium, Size::new(1024, 1024), requests, tokens);
    // i64::MAX tokens x a million requests: wrapped, this priced about two requests' worth.
    let e = run(mini, &medium(1_000_000, i64::MAX as u64), &adj).unwrap_err();
    assert!(e.0.contains("too large"), "{e}");
    // Every count that cannot be multiplied out is an error, whichever it is.
    assert!(run(mini, &medium(u64::MAX, 1), &adj).is_err());
    assert!(run(mini, &medium(2, u64::MAX), &adj).is_err());
    assert!(run(mini, &PlannedRequest { n: u64::MAX, ..medium(2, 0) }, &adj).is_err());
    assert!(run(mini, &PlannedRequest { partial_images: u64::MAX, ..medium(1, 0) }, &adj).is_err());
    assert!(
        run("dall-e-2", &PlannedRequest { n: u64::MAX, ..plan(Quality::Standard, Size::new(256, 256), 2, 0) }, &adj)
            .is_err()
    );
    // The largest products that still fit are exact, not saturated: i64::MAX tokens on one request.
    let one = run(mini, &medium(1, i64::MAX as u64), &adj).unwrap();
    assert_eq!(one.cost.usage.unwrap().input_text_tokens, i64::MAX as u64);

    // Words: 4 tokens per 3, rounded up, and never fewer tokens than words (the issue's i64::MAX words
    // wrapped to fewer).
    assert_eq!(tokens_for_words(i64::MAX as u64), Ok(12_297_829_382_473_034_410));
    assert!(tokens_for_words(u64::MAX).is_err());
    assert_eq!(tokens_for_words(MAX_PROMPT_WORDS), Ok(MAX_PROMPT_TOKENS));
}

#[test]
fn amounts_beyond_decimal_are_refused_not_panics() {
    // A price configured absurdly high: ten billion images at $1e20 leave Decimal's 28 digits, while
    // the token counts still fit.
    let flat = |usd: &str| -> ModelPrice {
        toml::from_str(&format!("billing_basis = \"flat\"\nflat_per_image = \"{usd}\"")).unwrap()
    };
    let huge = plan(Quality::Low, Size::new(64, 64), 10_000_000_000, 0);
    let e = estimate("flat", &flat("100000000000000000000"), &huge, &Adjustments::none("p")).unwrap_err();
    assert!(e.0.contains("too large"), "{e}");
    assert_eq!(estimate("flat", &flat("1"), &huge, &Adjustments::none("p")).unwrap().cost.total, d("10000000000"));
    // Compute time at an absurd hourly price.
    assert!(pricing::compute_cost(Decimal::MAX, u64::MAX).is_err());
}

fn count_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![Just(1), Just(MAX_REQUESTS), 1..=MAX_REQUESTS]
}

fn tokens_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0), Just(MAX_PROMPT_TOKENS), 0..=MAX_PROMPT_TOKENS]
}

fn words_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0), Just(MAX_PROMPT_WORDS), 0..=MAX_PROMPT_WORDS]
}

fn side() -> impl Strategy<Value = u32> {
    prop_oneof![Just(1), Just(MAX_IMAGE_SIDE), 1..=MAX_IMAGE_SIDE]
}

prop_compose! {
    /// Any plan within the limits, on any priced model, quality and size, on any tier and discount.
    fn any_plan()(
        which in 0..priced().len(),
        n in 1..=MAX_IMAGES_PER_REQUEST,
        requests in count_strategy(),
        prompt_tokens in tokens_strategy(),
        input_images in prop::collection::vec((side(), side()), 0..=MAX_INPUT_IMAGES),
        input_fidelity_high in any::<bool>(),
        partial_images in 0..=MAX_PARTIAL_IMAGES,
        tier in prop::sample::select(vec!["default", "flex", "batch"]),
        discount in prop_oneof![Just(0i64), -50i64..100],
    ) -> (String, PlannedRequest, Adjustments) {
        let (model, quality, size) = priced().swap_remove(which);
        let plan = PlannedRequest {
            quality,
            size,
            n,
            requests,
            prompt_tokens,
            input_images: input_images.into_iter().map(|(w, h)| Size::new(w, h)).collect(),
            input_fidelity_high,
            partial_images,
        };
        let adjustments = Adjustments {
            tier: tier.to_owned(),
            tier_multiplier: catalog().tier_multiplier(tier).unwrap(),
            provider: "p".into(),
            discount_percent: Decimal::from(discount),
        };
        (model, plan, adjustments)
    }
}

proptest! {
    #[test]
    fn an_estimate_is_count_times_one_request_exactly((model, plan, adj) in any_plan()) {
        let many = run(&model, &plan, &adj).unwrap();
        let one = run(&model, &PlannedRequest { requests: 1, ..plan.clone() }, &adj).unwrap();
        assert_scaled(&many, &one, plan.requests);
        // Discounts stay below 100%: every plan costs something.
        prop_assert!(one.cost.total > Decimal::ZERO);
    }

    #[test]
    fn an_estimate_grows_with_the_count((model, plan, adj) in any_plan()) {
        let requests = plan.requests.min(MAX_REQUESTS - 1);
        let fewer = run(&model, &PlannedRequest { requests, ..plan.clone() }, &adj).unwrap();
        let more = run(&model, &PlannedRequest { requests: requests + 1, ..plan }, &adj).unwrap();
        prop_assert!(more.cost.total > fewer.cost.total, "{} !> {}", more.cost.total, fewer.cost.total);
    }

    #[test]
    fn an_estimate_never_falls_as_the_prompt_grows((model, plan, adj) in any_plan()) {
        let tokens = plan.prompt_tokens.min(MAX_PROMPT_TOKENS - 1);
        let shorter = run(&model, &PlannedRequest { prompt_tokens: tokens, ..plan.clone() }, &adj).unwrap();
        let longer = run(&model, &PlannedRequest { prompt_tokens: tokens + 1, ..plan.clone() }, &adj).unwrap();
        prop_assert!(longer.cost.total >= shorter.cost.total);
        // Token-billed models charge every text token.
        if catalog().model(&model).unwrap().tokens.is_some() {
            prop_assert!(longer.cost.total > shorter.cost.total);
        }
    }

    #[test]
    fn an_estimate_never_falls_as_the_prompt_grows_in_words(
        (model, plan, adj) in any_plan(),
        words in words_strategy(),
    ) {
        let words = words.min(MAX_PROMPT_WORDS - 1);
        let at = |w: u64| {
            let tokens = tokens_for_words(w).unwrap();
            prop_assert!(tokens >= w && tokens <= MAX_PROMPT_TOKENS, "{w} words: {tokens} tokens");
            Ok(run(&model, &PlannedRequest { prompt_tokens: tokens, ..plan.clone() }, &adj).unwrap().cost.total)
        };
        let (shorter, longer) = (at(words)?, at(words + 1)?);
        prop_assert!(longer >= shorter);
        if catalog().model(&model).unwrap().tokens.is_some() {
            prop_assert!(longer > shorter);
        }
        // A count in words never prices below the same count in tokens.
        let as_tokens = run(&model, &PlannedRequest { prompt_tokens: words, ..plan.clone() }, &adj).unwrap();
        prop_assert!(shorter >= as_tokens.cost.total);
    }

    #[test]
    fn words_to_tokens_is_four_thirds_rounded_up(words in any::<u64>()) {
        let exact = (u128::from(words) * 4).div_ceil(3);
        match tokens_for_words(words) {
            Ok(t) => prop_assert_eq!(u128::from(t), exact),
            Err(_) => prop_assert!(exact > u128::from(u64::MAX)),
        }
    }
}
