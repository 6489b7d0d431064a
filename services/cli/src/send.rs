//! `tollguard send`: stream a partner file to an ingester over gRPC.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use tollguard_core::record::RawRecord;
use tollguard_ingester::service::raw_to_proto;
use tollguard_proto::v1 as pb;
use tollguard_proto::v1::ingest_client::IngestClient;

use crate::common::progress;
use crate::input::{Format, RecordReader};
use crate::replay::load_mapping;

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// Partner file (JSON Lines, or CSV with --csv-mapping).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Ingester gRPC address.
    #[arg(
        long,
        default_value = "http://127.0.0.1:50051",
        env = "TOLLGUARD_INGESTER"
    )]
    pub ingester: String,
    /// CA certificate (PEM) of the ingester's server certificate; with
    /// --cert and --key the ingester is reached over mutual TLS (use an
    /// https:// address).
    #[arg(long, value_name = "PEM", env = "TOLLGUARD_INGESTER_CA")]
    pub ca: Option<PathBuf>,
    /// This carrier's client certificate (PEM).
    #[arg(
        long,
        value_name = "PEM",
        env = "TOLLGUARD_INGESTER_CERT",
        requires = "key"
    )]
    pub cert: Option<PathBuf>,
    /// This carrier's client key (PEM).
    #[arg(
        long,
        value_name = "PEM",
        env = "TOLLGUARD_INGESTER_KEY",
        requires = "cert"
    )]
    pub key: Option<PathBuf>,
    /// Server name to verify in the ingester's certificate (default: the
    /// host of --ingester).
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Input format.
    #[arg(long, value_enum, default_value = "auto")]
    pub format: Format,
    /// CSV mapping (TOML).
    #[arg(long, value_name = "FILE")]
    pub csv_mapping: Option<PathBuf>,
    /// Records per batch.
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    /// Attempts per batch on RESOURCE_EXHAUSTED/UNAVAILABLE before giving up.
    #[arg(long, default_value_t = 20)]
    pub retries: u32,
    /// Per-call deadline in seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout_s: u64,
}

/// Summary of a send.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SendSummary {
    /// Records read.
    pub read: u64,
    /// Accepted by the ingester.
    pub accepted: u64,
    /// Rejected (invalid lines and per-record errors).
    pub rejected: u64,
    /// Batches refused entirely (e.g. PERMISSION_DENIED).
    pub refused_batches: u64,
}

async fn send_batch(
    client: &mut IngestClient<tonic::transport::Channel>,
    args: &SendArgs,
    batch_id: u64,
    records: &[RawRecord],
) -> Result<pb::PublishAck, tonic::Status> {
    let req = pb::PublishRequest {
        batch_id,
        records: records.iter().map(raw_to_proto).collect(),
    };
    let mut attempt = 0;
    loop {
        let mut r = tonic::Request::new(req.clone());
        r.set_timeout(Duration::from_secs(args.timeout_s));
        match client.publish_batch(r).await {
            Ok(ack) => return Ok(ack.into_inner()),
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::ResourceExhausted | tonic::Code::Unavailable
                ) && attempt < args.retries =>
            {
                attempt += 1;
                let wait = s
                    .metadata()
                    .get("retry-after-ms")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(200 * attempt as u64)
                    .min(10_000);
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            Err(s) => return Err(s),
        }
    }
}

/// Sends the file; per-record errors go to `err` by line number.
pub async fn run(args: &SendArgs, err: &mut dyn Write) -> anyhow::Result<SendSummary> {
    anyhow::ensure!(
        (1..=100_000).contains(&args.batch_size),
        "--batch-size must be between 1 and 100000"
    );
    let mapping = args.csv_mapping.as_ref().map(load_mapping).transpose()?;
    let reader = RecordReader::open(&args.file, args.format, mapping.as_ref())?;
    let mut endpoint = tonic::transport::Endpoint::from_shared(args.ingester.clone())
        .map_err(|e| anyhow::anyhow!("--ingester {}: {e}", args.ingester))?;
    if args.ca.is_some() || args.cert.is_some() {
        let read = |flag: &str, p: &PathBuf| {
            std::fs::read(p).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", p.display()))
        };
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &args.ca {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read("--ca", ca)?));
        }
        if let (Some(c), Some(k)) = (&args.cert, &args.key) {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read("--cert", c)?,
                read("--key", k)?,
            ));
        }
        if let Some(n) = &args.tls_server_name {
            tls = tls.domain_name(n.clone());
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| anyhow::anyhow!("TLS settings: {e}"))?;
    }
    let channel = endpoint
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to ingester {}: {e}", args.ingester))?;
    let mut client = IngestClient::new(channel)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20);
    let bar = progress(None, "sending");
    let mut s = SendSummary::default();
    let mut batch: Vec<RawRecord> = Vec::with_capacity(args.batch_size);
    let mut lines: Vec<u64> = Vec::with_capacity(args.batch_size);
    let mut batch_id = 0u64;
    let path = args.file.display().to_string();
    let mut reader = reader.peekable();
    loop {
        let next = reader.next();
        let done = next.is_none();
        if let Some((line, item)) = next {
            s.read += 1;
            match item {
                Ok(r) => {
                    batch.push(r);
                    lines.push(line);
                }
                Err(e) => {
                    s.rejected += 1;
                    writeln!(err, "{path}:{line}: {e}")?;
                }
            }
        }
        if batch.len() >= args.batch_size || (done && !batch.is_empty()) {
            batch_id += 1;
            match send_batch(&mut client, args, batch_id, &batch).await {
                Ok(ack) => {
                    s.accepted += ack.accepted as u64;
                    s.rejected += ack.rejected as u64;
                    for e in ack.errors {
                        let line = lines.get(e.index as usize).copied().unwrap_or(0);
                        writeln!(err, "{path}:{line}: {} {}: {}", e.code, e.field, e.reason)?;
                    }
                }
                Err(st) => {
                    s.refused_batches += 1;
                    s.rejected += batch.len() as u64;
                    writeln!(
                        err,
                        "{path}:{}-{}: batch refused: {:?}: {}",
                        lines.first().copied().unwrap_or(0),
                        lines.last().copied().unwrap_or(0),
                        st.code(),
                        st.message()
                    )?;
                    if matches!(
                        st.code(),
                        tonic::Code::Unavailable | tonic::Code::ResourceExhausted
                    ) {
                        anyhow::bail!(
                            "ingester unavailable after {} retries: {}",
                            args.retries,
                            st.message()
                        );
                    }
                }
            }
            bar.set_position(s.read);
            batch.clear();
            lines.clear();
        }
        if done {
            break;
        }
    }
    bar.finish_and_clear();
    writeln!(
        err,
        "sent {} records from {path}: {} accepted, {} rejected{}",
        s.read,
        s.accepted,
        s.rejected,
        if s.refused_batches > 0 {
            format!(", {} batch(es) refused", s.refused_batches)
        } else {
            String::new()
        }
    )?;
    Ok(s)
}
