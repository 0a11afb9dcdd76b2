//! The usage console over real HTTP: the login form, sessions in an HttpOnly, SameSite cookie, only
//! admin keys let in, redirects without a session, logout. On SQLite and, with
//! `IMAGEGATE_TEST_DATABASE_URL`, PostgreSQL. (The pages' contents in a browser come with the rest of
//! the console.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::gateway;
use ledger::testing::TestDatabase;
use ledger::{NewKey, Scope};

on_both_databases!(only_an_admin_key_opens_a_console_session, the_console_shows_what_was_spent_exactly);

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
    assert!(all.contains("<td>app</td><td>dall-e-2</td>") && all.contains("<option>dall-e-2</option>"), "{all}");
    let mini = get("?model=gpt-image-1-mini").await;
    assert_eq!(mini.matches("<td>app</td><td>gpt-image-1-mini</td>").count(), 3, "{mini}");
    assert!(!mini.contains("<td>app</td><td>dall-e-2</td>"), "{mini}");
    assert!(mini.contains("<option selected>gpt-image-1-mini</option>"), "{mini}");
}
