//! `fake-openai --listen 127.0.0.1:0`: serves the fake OpenAI Images API until killed.
//!
//! Prints exactly one line, `listening on http://ADDR`, to stdout once bound.
#![allow(clippy::print_stdout)]

use std::io::Write as _;
use std::net::SocketAddr;

use clap::Parser;

/// A fake OpenAI Images API upstream, for tests.
#[derive(Debug, Parser)]
#[command(name = "fake-openai", version)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The only API key accepted (`Authorization: Bearer KEY`).
    #[arg(long, default_value = fake_openai::DEFAULT_KEY)]
    api_key: String,
    /// A model to answer as shut down (404 `model_not_found`), as OpenAI does after a shutdown;
    /// repeatable.
    #[arg(long = "shut-down", value_name = "MODEL")]
    shut_down: Vec<String>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let state = fake_openai::FakeState::with_key(addr, &args.api_key);
    for model in &args.shut_down {
        state.shut_down(model);
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{addr}")?;
        out.flush()?;
    }
    fake_openai::serve(listener, state).await
}
