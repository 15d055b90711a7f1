//! `turnstile inspect`: the pinned kernel maps of a running (or last) gateway,
//! as tables. Column names are the maps' BTF field names, the same ones
//! `bpftool map dump pinned <dir>/<MAP>` prints.

use std::fmt::Write as _;
use std::path::Path;

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray};
use gateway_common::{ClientKey, Config, MAX_MODELS, ModelName, ModelStats, Penalty, RefuseStats, map_names};

use super::loader::key_addr;

/// Runs `turnstile inspect`: prints every map pinned in `bpffs_dir` as a table.
pub fn run(bpffs_dir: &Path) -> anyhow::Result<()> {
    print!("{}", render(bpffs_dir)?);
    Ok(())
}

fn open(dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

/// The tables, as text.
pub fn render(dir: &Path) -> anyhow::Result<String> {
    let mut out = format!("Kernel assist maps pinned in {}\n", dir.display());

    let config: Array<MapData, Config> = open(dir, map_names::CONFIG)?.try_into()?;
    let Config { proxy_port, _pad } = config.get(&0, 0)?;
    section(&mut out, map_names::CONFIG, "array: the port fast reject guards");
    table(&mut out, &["proxy_port"], &[vec![proxy_port.to_string()]]);

    let names: Array<MapData, ModelName> = open(dir, map_names::MODEL_NAMES)?.try_into()?;
    let stats: PerCpuArray<MapData, ModelStats> = open(dir, map_names::MODEL_STATS)?.try_into()?;
    let mut rows = Vec::new();
    for id in 1..MAX_MODELS {
        let name = names.get(&id, 0)?;
        if name.len == 0 {
            continue;
        }
        let mut total = ModelStats::default();
        for value in stats.get(&id, 0)?.iter() {
            total.add(value);
        }
        let label = String::from_utf8_lossy(&name.name[..(name.len as usize).min(name.name.len())]).into_owned();
        let ModelStats {
            client_in_packets,
            client_in_bytes,
            client_out_packets,
            client_out_bytes,
            upstream_in_packets,
            upstream_in_bytes,
            upstream_out_packets,
            upstream_out_bytes,
            client_connections,
            upstream_connections,
        } = total;
        rows.push(
            [
                id.to_string(),
                label,
                client_in_packets.to_string(),
                client_in_bytes.to_string(),
                client_out_packets.to_string(),
                client_out_bytes.to_string(),
                upstream_in_packets.to_string(),
                upstream_in_bytes.to_string(),
                upstream_out_packets.to_string(),
                upstream_out_bytes.to_string(),
                client_connections.to_string(),
                upstream_connections.to_string(),
            ]
            .to_vec(),
        );
    }
    section(&mut out, map_names::MODEL_STATS, "per-CPU array, summed over CPUs; model names from MODEL_NAMES");
    table(
        &mut out,
        &[
            "id",
            "model",
            "client_in_packets",
            "client_in_bytes",
            "client_out_packets",
            "client_out_bytes",
            "upstream_in_packets",
            "upstream_in_bytes",
            "upstream_out_packets",
            "upstream_out_bytes",
            "client_connections",
            "upstream_connections",
        ],
        &rows,
    );

    let penalties: BpfHashMap<MapData, ClientKey, Penalty> = open(dir, map_names::PENALTIES)?.try_into()?;
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let mut rows = Vec::new();
    for entry in penalties.iter() {
        let (key, Penalty { expires_ns, until_unix_ms }) = entry?;
        let remaining = until_unix_ms.saturating_sub(now_ms);
        rows.push(vec![
            key_addr(&key).to_string(),
            expires_ns.to_string(),
            until_unix_ms.to_string(),
            if remaining == 0 { "expired".to_owned() } else { format!("{:.1}", remaining as f64 / 1000.0) },
        ]);
    }
    rows.sort();
    section(&mut out, map_names::PENALTIES, "LRU hash: client address → penalty");
    table(&mut out, &["addr", "expires_ns", "until_unix_ms", "remaining_s"], &rows);

    let refused: PerCpuArray<MapData, RefuseStats> = open(dir, map_names::REFUSED)?.try_into()?;
    let mut total = RefuseStats::default();
    for value in refused.get(&0, 0)?.iter() {
        total.sk_lookup += value.sk_lookup;
        total.xdp += value.xdp;
    }
    section(&mut out, map_names::REFUSED, "per-CPU array, summed over CPUs");
    table(&mut out, &["sk_lookup", "xdp"], &[vec![total.sk_lookup.to_string(), total.xdp.to_string()]]);

    for name in [map_names::SOCK_TAGS, map_names::CONN_STATE] {
        section(&mut out, name, "socket storage: one value per tagged socket, freed with it; not listable");
    }
    Ok(out)
}

fn section(out: &mut String, name: &str, what: &str) {
    let _ = write!(out, "\n{name} ({what})\n");
}

/// A plain text table with a header row, columns padded to their widest cell.
pub fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |out: &mut String, cells: Vec<&str>| {
        let text: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "  {}", text.join("  ").trim_end());
    };
    line(out, header.to_vec());
    if rows.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for row in rows {
        line(out, row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_columns() {
        let mut out = String::new();
        table(&mut out, &["addr", "n"], &[vec!["127.0.0.2".into(), "7".into()]]);
        assert_eq!(out, "  addr       n\n  127.0.0.2  7\n");
        let mut empty = String::new();
        table(&mut empty, &["a"], &[]);
        assert_eq!(empty, "  a\n  (none)\n");
    }
}
