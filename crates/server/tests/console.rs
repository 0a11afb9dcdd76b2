//! The usage console over real HTTP: the login form, sessions in an HttpOnly, SameSite cookie, only
//! admin keys let in, redirects without a session, logout. On SQLite and, with
//! `IMAGEGATE_TEST_DATABASE_URL`, PostgreSQL; what the pages show after requests, splits, filters,
//! batches, the CSV download (the usage report's) and the estimate form. (In a browser:
//! tests/console.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::gateway;
use ledger::testing::TestDatabase;
use ledger::{NewKey, Scope};

on_both_databases!(
    only_an_admin_key_opens_a_console_session,
    the_console_shows_what_was_spent_exactly,
    the_console_splits_filters_downloads_and_estimates
);

async fn only_an_admin_key_opens_a_console_session(db: &TestDatabase) {
    let gw = gateway(db).await;
    let base = gw.url.trim_end_matches("/v1").to_owned();
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let location = |r: &reqwest::Response| r.headers()["location"].to_str().unwrap().to_owned();
    let login = |key: String, https: bool| {
        let mut r = http.post(format!("{base}/console/login")).form(&[("key", key)]);
        if https {
            r = r.header("x-forwarded-proto", "https");
        }
        r.send()
    };

    // No session: to the login form, which asks for the key in a password field.
    let r = http.get(format!("{base}/console")).send().await.unwrap();
    assert_eq!((r.status().as_u16(), location(&r)), (303, "/console/login".to_owned()));
    let r = http.get(format!("{base}/console/login")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let form = r.text().await.unwrap();
    assert!(form.contains(r#"action="/console/login""#) && form.contains(r#"type="password""#), "{form}");

    let admin = gw.key(NewKey { scope: Scope::Admin, ..NewKey::user("ops <admin>") }).await;
    let user = gw.key(NewKey::user("app")).await;

    // A user key and a wrong key are refused on the form, with no cookie and no key in the page.
    for (key, status) in [(user.clone(), 403), (format!("{admin}x"), 401)] {
        let r = login(key.clone(), false).await.unwrap();
        assert_eq!(r.status().as_u16(), status);
        assert!(r.headers().get("set-cookie").is_none());
        let page = r.text().await.unwrap();
        assert!(!page.contains(&key), "the key was echoed");
    }

    // A form without the key, or no form at all: the login page again, saying what to do.
    let r = http.post(format!("{base}/console/login")).form(&[("other", "x")]).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    let r = http.post(format!("{base}/console/login")).body("key=x").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("login form"));

    // An admin key: a session cookie, HttpOnly and SameSite, and not the key.
    let r = login(admin.clone(), false).await.unwrap();
    assert_eq!((r.status().as_u16(), location(&r)), (303, "/console".to_owned()));
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(cookie.contains(attribute), "{attribute} missing: {cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP: a Secure cookie would never come back: {cookie}");
    assert!(!cookie.contains(&admin), "{cookie}");
    let session = cookie.split(';').next().unwrap().to_owned();
    assert!(session.starts_with("imagegate_console=igs_"), "{session}");

    // With it, the console: every key, names escaped, no secret.
    let r = http.get(format!("{base}/console")).header("cookie", &session).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let page = r.text().await.unwrap();
    assert!(page.contains("ops &lt;admin&gt;") && !page.contains("ops <admin>"), "{page}");
    assert!(page.contains("<td>app</td>"), "{page}");
    assert!(!page.contains(&admin) && !page.contains(&user));

    // Behind an HTTPS proxy the cookie is Secure.
    let r = login(admin.clone(), true).await.unwrap();
    assert!(r.headers()["set-cookie"].to_str().unwrap().contains("; Secure"));

    // Logging out ends the session everywhere: the old cookie leads back to the form.
    let r = http.post(format!("{base}/console/logout")).header("cookie", &session).send().await.unwrap();
    assert_eq!((r.status().as_u16(), location(&r)), (303, "/console/login".to_owned()));
    assert!(r.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    let r = http.get(format!("{base}/console")).header("cookie", &session).send().await.unwrap();
    assert_eq!(r.status(), 303);

    // A revoked key's sessions end at once.
    let r = login(admin.clone(), false).await.unwrap();
    let session = r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    let id = gw.ledger.list_keys().await.unwrap().into_iter().find(|k| k.name == "ops <admin>").unwrap().id;
    gw.ledger.revoke_key(&id).await.unwrap();
    let r = http.get(format!("{base}/console")).header("cookie", &session).send().await.unwrap();
    assert_eq!((r.status().as_u16(), location(&r)), (303, "/console/login".to_owned()));
}

/// Requests through the fake upstream, then the console: the model's total is the sum of the costs the
/// responses reported, exactly, and the chart has its bar.
async fn the_console_shows_what_was_spent_exactly(db: &TestDatabase) {
    let gw = gateway(db).await;
    let base = gw.url.trim_end_matches("/v1").to_owned();
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let admin = gw.key(NewKey { scope: Scope::Admin, ..NewKey::user("ops") }).await;
    let user = gw.key(NewKey::user("app")).await;
    let mut spent = rust_decimal::Decimal::ZERO;
    for prompt in ["an otter", "two otters swimming", "a lighthouse at dusk"] {
        let reply = gw.generate(&user, prompt).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        spent += reply.cost();
    }
    let r = http.post(format!("{base}/console/login")).form(&[("key", admin)]).send().await.unwrap();
    let session = r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    let page =
        http.get(format!("{base}/console")).header("cookie", &session).send().await.unwrap().text().await.unwrap();
    let row = format!("gpt-image-1-mini</td><td>3</td><td>3</td><td>${}</td>", spent.normalize());
    assert!(page.contains(&row), "{row} missing from:\n{page}");
    assert!(page.contains(&format!("<th>Total</th><th>3</th><th>3</th><th>${}</th>", spent.normalize())), "{page}");
    let bar = page.matches("<rect ").count();
    assert_eq!(bar, 1, "one bar, today's: {page}");
    assert!(page.contains(&format!("gpt-image-1-mini: ${}</title>", spent.normalize())), "{page}");
    // The key's spend in the keys table, and each request in the ledger table, by key name.
    assert!(page.contains("<td>app</td><td><code>"), "{page}");
    assert_eq!(page.matches("<td>app</td><td>gpt-image-1-mini</td>").count(), 3, "{page}");

    // Another model's request: the filter shows one model's rows only.
    let dalle = gw.generate_with(Some(&user), serde_json::json!({"model": "dall-e-2", "prompt": "a fox"}), None).await;
    assert_eq!(dalle.status, 200, "{}", dalle.body);
    let get = |query: &'static str| {
        let (http, base, session) = (http.clone(), base.clone(), session.clone());
        async move {
            http.get(format!("{base}/console{query}"))
                .header("cookie", session)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let all = get("").await;
    assert!(
        all.contains("<td>app</td><td>dall-e-2</td>") && all.contains(r#"<option value="dall-e-2">dall-e-2</option>"#),
        "{all}"
    );
    let mini = get("?model=gpt-image-1-mini").await;
    assert_eq!(mini.matches("<td>app</td><td>gpt-image-1-mini</td>").count(), 3, "{mini}");
    assert!(!mini.contains("<td>app</td><td>dall-e-2</td>"), "{mini}");
    assert!(mini.contains(r#"<option value="gpt-image-1-mini" selected>gpt-image-1-mini</option>"#), "{mini}");
}

/// Splits by key and hour, the request filters, a batch's progress and cost, the CSV download (the
/// ledger's usage report, as `imagegate usage --csv` writes it), the estimate form (the estimates
/// endpoint's total), and bad views refused with the field named.
async fn the_console_splits_filters_downloads_and_estimates(db: &TestDatabase) {
    use common::batch::{create, jsonl, line, until_done, upload};
    use ledger::report::By;

    let gw = gateway(db).await;
    let base = gw.url.trim_end_matches("/v1").to_owned();
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let admin = gw.key(NewKey { scope: Scope::Admin, ..NewKey::user("ops") }).await;
    let (app_id, app) = gw.capped_key("app", rust_decimal::Decimal::TEN).await;
    let (_, broke) = gw.capped_key("broke", rust_decimal::Decimal::ZERO).await;
    let mut spent = rust_decimal::Decimal::ZERO;
    for prompt in ["an otter", "a heron"] {
        let reply = gw.generate(&app, prompt).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        spent += reply.cost();
    }
    let refused = gw.generate(&broke, "a fox").await;
    assert_eq!(refused.status, 429, "{}", refused.body);

    // A batch of two lines, run through the Batch API to the end.
    let lines = [line("a", common::medium("a crane <1>")), line("b", common::medium("a crane <2>"))];
    let file = upload(&gw, &app, jsonl(&lines)).await;
    let batch = create(&gw, &app, file["id"].as_str().unwrap()).await;
    let batch_id = batch["id"].as_str().unwrap().to_owned();
    assert_eq!(until_done(&gw, &app, &batch_id).await["status"], "completed");
    let batch_cost: rust_decimal::Decimal =
        gw.rows_of(&app_id).await.iter().filter(|r| r.entry.tier == "batch").map(|r| r.cost_usd).sum();
    assert!(batch_cost > rust_decimal::Decimal::ZERO);

    let r = http.post(format!("{base}/console/login")).form(&[("key", admin)]).send().await.unwrap();
    let session = r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    let get = |path: String| {
        let (http, session) = (http.clone(), session.clone());
        async move {
            let r = http.get(path).header("cookie", session).send().await.unwrap();
            (r.status().as_u16(), r.headers().clone(), r.text().await.unwrap())
        }
    };

    // By key: each key's total under its name and prefix, exact; the refusal costs nothing.
    let (status, _, page) = get(format!("{base}/console?by=key")).await;
    assert_eq!(status, 200, "{page}");
    let prefix = &app[..11];
    let row = format!("app ({prefix})</td><td>4</td><td>4</td><td>${}</td>", (spent + batch_cost).normalize());
    assert!(page.contains(&row), "{row} missing from:\n{page}");
    assert!(page.contains("Spend per day by key"), "{page}");
    // The batch: done, both lines, what they cost.
    let batch_row =
        format!("<tr><td><code>{batch_id}</code></td><td>app</td><td>/v1/images/generations</td><td>completed</td>");
    assert!(page.contains(&batch_row), "{page}");
    assert!(page.contains(&format!("2 of 2</td><td>2</td><td>0</td><td>${}</td>", batch_cost.normalize())), "{page}");
    // Keys: the app key's budget and last use; the broke key at its cap, highlighted.
    assert!(page.contains("<td>$10 in total</td>"), "{page}");
    assert!(page.contains(r#"<tr class="near"><td>broke</td>"#), "{page}");
    assert!(page.contains("<td>never</td>"), "the admin key made no request: {page}");

    // Per hour, by model: the ledger's clock stands still, so one hour's bar, of the one model.
    let (_, _, page) = get(format!("{base}/console?bucket=hour")).await;
    assert!(page.contains("Spend per hour by model"), "{page}");
    assert_eq!(page.matches("<rect ").count(), 1, "{page}");

    // The refused request, alone under its filter, with why.
    let (_, _, page) = get(format!("{base}/console?status=refused")).await;
    assert_eq!(page.matches("<td>refused</td>").count(), 1, "{page}");
    assert!(page.contains("<td>refused</td><td>$0</td><td>insufficient_quota</td>"), "{page}");
    let (_, _, page) = get(format!("{base}/console?key={app_id}&status=succeeded")).await;
    assert_eq!(page.matches("<td>succeeded</td>").count(), 4, "{page}");
    assert!(!page.contains("<td>broke</td><td>gpt-image-1-mini"), "{page}");

    // The CSV: the usage report's, as an attachment.
    let today = gw.ledger.now().date_naive();
    let (status, headers, csv) = get(format!("{base}/console/usage.csv?from={today}&to={today}&by=model,day")).await;
    assert_eq!(status, 200, "{csv}");
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/csv"));
    assert_eq!(headers["content-disposition"], format!("attachment; filename=\"imagegate-usage-{today}-{today}.csv\""));
    let start = today.and_hms_opt(0, 0, 0).unwrap().and_utc();
    let report =
        gw.ledger.usage_report(&[By::Model, By::Day], start, Some(start + chrono::Duration::days(1))).await.unwrap();
    assert_eq!(csv, report.csv());
    assert!(csv.starts_with("model,day,requests,"), "{csv}");
    let (status, _, text) = get(format!("{base}/console/usage.csv?by=colour")).await;
    assert_eq!(status, 400);
    assert!(text.contains("colour") && text.contains("model"), "{text}");
    let r = http.get(format!("{base}/console/usage.csv")).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.headers()["location"].to_str().unwrap()), (303, "/console/login"));

    // Bad views: said, with the field and what is allowed, and the default view shown.
    for (query, says) in [
        ("?from=2026-12-05&to=2026-12-01", "is after to"),
        ("?by=colour", "use one of model, key, project, provider, tier, basis"),
        ("?from=yesterday", "from: &quot;yesterday&quot; is not a date"),
        ("?from=2026-01-01&to=2026-12-01&bucket=hour", "at most 14"),
    ] {
        let (status, _, page) = get(format!("{base}/console{query}")).await;
        assert_eq!(status, 400, "{query}");
        assert!(page.contains(says), "{query}: {page}");
        assert!(page.contains("Spend per day by model"), "{query}");
    }

    // The estimate form prices with the estimates endpoint's own code.
    let plan = serde_json::json!({"requests": [{"model": "gpt-image-1-mini", "quality": "low", "size": "1024x1024", "n": 2, "count": 3, "prompt_words": 12}]});
    let r = gw.http.post(format!("{}/images/estimates", gw.url)).bearer_auth(&app).json(&plan).send().await.unwrap();
    let expected: serde_json::Value = r.json().await.unwrap();
    let (status, _, page) = get(format!(
        "{base}/console/estimate?model=gpt-image-1-mini&quality=low&size=1024x1024&n=2&count=3&prompt_words=12"
    ))
    .await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains(&format!("Estimated total: ${}</h2>", expected["total_usd"].as_str().unwrap())), "{page}");
    let (status, _, page) = get(format!("{base}/console/estimate?model=gpt-image-1-mini&n=0&prompt=an+otter")).await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("role=\"alert\">n: "), "{page}");
}
