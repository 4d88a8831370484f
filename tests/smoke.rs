mod support;
use serde_json::json;
use support::app::TestServer;

#[tokio::test]
async fn smoke() {
    let s = TestServer::start(&[]).await;
    let mut a = s.ws().await;
    a.send(json!({"type":"join","key":"r","version":0})).await;
    println!("{}", a.recv().await);
    a.send(json!({"type":"add","number":17})).await;
    println!("{}", a.recv().await);
    let mut b = s.ws().await;
    b.send(json!({"type":"join","key":"r"})).await;
    println!("{}", b.recv().await);
    let mut c = s.ws().await;
    c.send(json!({"type":"getHistory","key":"r"})).await;
    println!("{}", c.recv().await);
    c.send(json!({"type":"saveNumber","key":"r","number":"00"})).await;
    println!("a {}", a.recv().await);
    println!("b {}", b.recv().await);
    println!("c {}", c.recv().await);
    a.send(json!({"type":"remove","index":0})).await;
    println!("a {}", a.recv().await);
    println!("b {}", b.recv().await);
    println!("c {}", c.recv().await);
    a.send(json!({"type":"x"})).await;
    println!("a {}", a.recv().await);
}
