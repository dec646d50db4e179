//! Failures that are not the contract's: a stopped or hung node, no contract at the address,
//! a bad key file, a refused deployment.

use std::time::{Duration, Instant};

use modelhub_chain::{Address, ChainError, Marketplace, Revert, U256, load_signer};
use modelhub_testkit::ScriptServer;

use crate::{Chain, key};

#[tokio::test]
async fn a_stopped_node_is_a_quick_rpc_error() {
    let chain = Chain::start().await;
    let market = chain.as_account(3).await;
    assert_eq!(
        market.credits_of(Chain::address(3)).await.unwrap(),
        U256::ZERO
    );
    chain.node.stop();

    let started = Instant::now();
    let err = market.credits_of(Chain::address(3)).await.unwrap_err();
    assert!(matches!(err, ChainError::Rpc(_)), "{err:?}");
    let err = market.buy_credits(U256::from(1)).await.unwrap_err();
    assert!(matches!(err, ChainError::Rpc(_)), "{err:?}");
    let err = market.block_number().await.unwrap_err();
    assert!(matches!(err, ChainError::Rpc(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The URL (which may hold an API key) is not in the message.
    assert!(!err.to_string().contains(&chain.node.uri), "{err}");

    let err = Marketplace::connect(&chain.node.uri, chain.admin.address(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, ChainError::Rpc(_)), "{err:?}");
}

#[tokio::test]
async fn a_hung_node_times_out() {
    // Accepts connections, never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let started = Instant::now();
    let err = Marketplace::connect_with_timeouts(
        &url,
        Address::repeat_byte(1),
        None,
        Duration::from_millis(300),
        Duration::from_secs(1),
    )
    .await
    .unwrap_err();
    match &err {
        ChainError::Rpc(m) => assert!(m.contains("no answer"), "{m}"),
        other => panic!("expected Rpc, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    held.abort();
}

#[tokio::test]
async fn no_contract_at_the_address_is_invalid() {
    let node = ScriptServer::start("anvil");
    let empty = Address::repeat_byte(0x11);
    match Marketplace::connect(&node.uri, empty, None).await {
        Err(ChainError::Invalid(m)) => assert!(m.contains("no contract at"), "{m}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    for bad in ["not a url", "ftp://127.0.0.1:1"] {
        match Marketplace::connect(bad, empty, None).await {
            Err(ChainError::Invalid(_)) => {}
            other => panic!("{bad}: expected Invalid, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_refused_deployment_is_decoded() {
    let node = ScriptServer::start("anvil");
    match Marketplace::deploy(&node.uri, key(0), Address::ZERO, U256::from(1), None).await {
        Err(ChainError::Reverted(Revert::ZeroAddress)) => {}
        other => panic!("expected ZeroAddress, got {other:?}"),
    }
    match Marketplace::deploy(&node.uri, key(0), key(0).address(), U256::ZERO, None).await {
        Err(ChainError::Reverted(Revert::InvalidRate)) => {}
        other => panic!("expected InvalidRate, got {other:?}"),
    }
}

#[tokio::test]
async fn a_bad_key_file_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("operator.key");
    std::fs::write(&path, "0x1234 not a key\n").unwrap();
    let err = load_signer(&path).unwrap_err();
    assert!(matches!(err, ChainError::Invalid(_)), "{err:?}");
    assert!(!err.to_string().contains("1234"), "{err}");
    let err = load_signer(&dir.path().join("absent.key")).unwrap_err();
    assert!(matches!(err, ChainError::Invalid(_)), "{err:?}");

    std::fs::write(&path, format!("  {}  \n", crate::KEYS[1])).unwrap();
    assert_eq!(load_signer(&path).unwrap().address(), Chain::address(1));
}
