//! Key names through the admin API: a new name with a control character (what drives a terminal
//! when the name is later listed) is refused with OpenAI's 400 envelope naming `name`, on create and
//! on update, and nothing is stored; names that merely look like spreadsheet formulas are ordinary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ledger::{Ledger, LedgerOptions, NewKey, Scope};
use serde_json::{Value, json};
use server::config::{Config, Env};

struct TestEnv;
impl Env for TestEnv {
    fn var(&self, name: &str) -> Option<String> {
        (name == "FAKE_UPSTREAM_KEY").then(|| "sk-upstream".to_owned())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_api_refuses_control_characters_in_key_names() {
    let db = ledger::testing::TestDatabase::sqlite().unwrap();
    let fake = fake_openai::spawn().await.unwrap();
    let toml = format!(
        "[providers.openai]\nbase_url = \"{}\"\nmodels = [\"dall-e-2\"]\napi_key_env = \"FAKE_UPSTREAM_KEY\"\n",
        fake.base_url()
    );
    let config = Config::from_toml(&toml, &TestEnv).unwrap();
    let ledger = Ledger::connect_with(&db.url, LedgerOptions::default()).await.unwrap();
    let state = server::AppState::from_config(&config).unwrap().with_ledger(ledger.clone()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/admin/keys", listener.local_addr().unwrap());
    tokio::spawn(server::run(listener, server::app(state), std::future::pending()));
    let admin = ledger.create_key(NewKey { scope: Scope::Admin, ..NewKey::user("admin") }).await.unwrap().secret;
    let http = reqwest::Client::new();
    let post = |url: String, body: Value| {
        let request = http.post(url).bearer_auth(&admin).json(&body);
        async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };

    for name in ["\u{1b}[2J\u{1b}[31mpwned", "a\tb", "c1\u{9b}2J"] {
        let (status, body) = post(url.clone(), json!({ "name": name })).await;
        assert_eq!(status, 400, "{body}");
        let error = &body["error"];
        assert_eq!(
            (&error["type"], &error["param"], &error["code"]),
            (&json!("invalid_request_error"), &json!("name"), &json!("invalid_value"))
        );
        assert!(error["message"].as_str().unwrap().contains("cannot contain control characters"), "{body}");
    }
    let (status, body) = post(url.clone(), json!({ "name": "  " })).await;
    assert_eq!((status, &body["error"]["param"]), (400, &json!("name")), "{body}");
    assert_eq!(ledger.list_keys().await.unwrap().len(), 1, "only the admin key exists");

    let formula = "=HYPERLINK(\"http://evil\",\"x\")";
    let (status, created) = post(url.clone(), json!({ "name": formula })).await;
    assert_eq!((status, &created["name"]), (201, &json!(formula)), "{created}");
    let id = created["id"].as_str().unwrap();
    let (status, body) = post(format!("{url}/{id}"), json!({ "name": "x\u{7f}" })).await;
    assert_eq!((status, &body["error"]["param"]), (400, &json!("name")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("U+007F"), "{body}");
    assert_eq!(ledger.get_key(id).await.unwrap().name, formula, "the refused update changed nothing");
    let (status, body) = post(format!("{url}/{id}"), json!({ "name": "renamed" })).await;
    assert_eq!((status, &body["name"]), (200, &json!("renamed")), "{body}");
    ledger.close().await;
    db.finish().await.unwrap();
}
