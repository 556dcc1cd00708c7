//! VM resources on the command line: `--resource KIND:NAME[,key=value...]` for `vm create`,
//! and the resource tables of `vm show` and `migrations show`.

use godwit_api::{
    Attachment, Binding, ClusterMigration, ClusterVm, ResourceKind, ResourceSpec, ResourceStatus,
};

const KEYS: &str = "binding, attachment, size_mib, class, allow_global_ref or port";

/// Parses `KIND:NAME[,key=value...]`, e.g. `disk:root,size_mib=64,allow_global_ref=false` or
/// `device:rng,class=entropy`. Unset keys keep the API's defaults. The error is a sentence for
/// clap to print after the flag.
pub fn parse_resource(text: &str) -> Result<ResourceSpec, String> {
    let Some((kind, rest)) = text.split_once(':') else {
        return Err(format!(
            "{text:?} is not KIND:NAME[,key=value...] (e.g. disk:root,size_mib=64)"
        ));
    };
    let kind = match kind {
        "disk" => ResourceKind::Disk,
        "endpoint" => ResourceKind::Endpoint,
        "scratch" => ResourceKind::Scratch,
        "device" => ResourceKind::Device,
        other => {
            return Err(format!(
                "unknown resource kind {other:?}: use disk, endpoint, scratch or device"
            ))
        }
    };
    let mut parts = rest.split(',');
    let name = parts.next().unwrap_or_default();
    if name.is_empty() || name.contains('=') {
        return Err(format!("resource {text:?} has no name after {kind}:"));
    }
    let mut spec = ResourceSpec::new(name, kind);
    let mut seen = Vec::new();
    for part in parts {
        let Some((key, value)) = part.split_once('=') else {
            return Err(format!(
                "{part:?} in resource {name} is not key=value (keys: {KEYS})"
            ));
        };
        if seen.contains(&key) {
            return Err(format!("resource {name} sets {key} twice"));
        }
        seen.push(key);
        let bad = |what: &str| format!("{key}={value:?} in resource {name}: {what}");
        match key {
            "binding" => {
                spec.binding = Some(match value {
                    "identifier" => Binding::Identifier,
                    "value" => Binding::Value,
                    "type" => Binding::Type,
                    _ => return Err(bad("use identifier, value or type")),
                })
            }
            "attachment" => {
                spec.attachment = Some(match value {
                    "unattached" => Attachment::Unattached,
                    "fastened" => Attachment::Fastened,
                    "fixed" => Attachment::Fixed,
                    _ => return Err(bad("use unattached, fastened or fixed")),
                })
            }
            "size_mib" => {
                spec.size_mib = Some(
                    value
                        .parse()
                        .map_err(|_| bad("not a whole number of MiB"))?,
                )
            }
            "class" if value.is_empty() => return Err(bad("the class is empty")),
            "class" => spec.class = Some(value.to_owned()),
            "allow_global_ref" => {
                spec.allow_global_ref = match value {
                    "true" | "yes" => true,
                    "false" | "no" => false,
                    _ => return Err(bad("use true or false")),
                }
            }
            "port" => spec.port = Some(value.parse().map_err(|_| bad("not a TCP port (0-65535)"))?),
            _ => {
                return Err(format!(
                    "unknown key {key:?} in resource {name}: use {KEYS}"
                ))
            }
        }
    }
    Ok(spec)
}

/// `vm show`'s resources: where each is bound now (as the agent reports), else as declared.
pub fn print_vm_resources(vm: &ClusterVm) {
    let reported = vm.info.as_ref().map(|i| &i.resources);
    if vm.spec.resources.is_empty() && reported.is_none_or(|r| r.is_empty()) {
        return;
    }
    println!("resources:");
    println!(
        "  {:<10} {:<9} {:<11} {:<11} {:<12} {:<22} LOCATION",
        "NAME", "KIND", "BINDING", "ATTACHMENT", "HOST", "ADDRESS"
    );
    match reported.filter(|r| !r.is_empty()) {
        Some(resources) => {
            for r in resources {
                println!(
                    "  {:<10} {:<9} {:<11} {:<11} {:<12} {:<22} {}",
                    r.spec.name,
                    r.spec.kind.as_str(),
                    api_name(&r.binding),
                    api_name(&r.attachment),
                    r.host,
                    r.address.as_deref().unwrap_or("-"),
                    r.location
                );
            }
        }
        None => {
            for r in &vm.spec.resources {
                println!(
                    "  {:<10} {:<9} {:<11} {:<11} {:<12} {:<22} (not reported)",
                    r.name,
                    r.kind.as_str(),
                    api_name(&r.binding.unwrap_or(r.kind.default_binding())),
                    api_name(&r.attachment.unwrap_or(r.kind.default_attachment())),
                    "-",
                    "-"
                );
            }
        }
    }
}

/// `migrations show`'s table: what the migration did with each resource, and why.
pub fn print_migration_resources(m: &ClusterMigration) {
    let resources = m
        .stats
        .as_ref()
        .map(|s| s.resources.as_slice())
        .unwrap_or(&[]);
    if resources.is_empty() {
        println!("resources:  none");
        return;
    }
    println!("resources:");
    println!(
        "  {:<10} {:<9} {:<14} {:<8} {:>10} {:>9}  DETAIL/REASON",
        "NAME", "KIND", "ACTION", "STATUS", "BYTES", "TIME"
    );
    for r in resources {
        let action = if r.fallback {
            format!("{} (fallback)", r.action.code())
        } else {
            r.action.code().to_owned()
        };
        let status = match r.status {
            ResourceStatus::Pending => "pending",
            ResourceStatus::Running => "running",
            ResourceStatus::Done => "done",
            ResourceStatus::Failed => "FAILED",
        };
        let detail = match (&r.error, r.detail.is_empty()) {
            (Some(e), _) => format!("error: {e}"),
            (None, false) => r.detail.clone(),
            (None, true) => r.reason.clone(),
        };
        println!(
            "  {:<10} {:<9} {:<14} {:<8} {:>10} {:>7.0}ms  {}",
            r.name,
            r.kind.as_str(),
            action,
            status,
            bytes(r.bytes),
            r.duration_ms,
            detail
        );
    }
    // The table shows what was done; the reasons say why this action of the row.
    for r in resources
        .iter()
        .filter(|r| r.error.is_some() || !r.detail.is_empty())
    {
        println!("  why {}: {}", r.name, r.reason);
    }
}

fn api_name(v: &impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "?".into(),
    }
}

/// Bytes in the largest binary unit that keeps the number at 1 or more.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kind_name_and_every_key() {
        let r = parse_resource("disk:root").unwrap();
        assert_eq!(r, ResourceSpec::new("root", ResourceKind::Disk));
        let r = parse_resource(
            "disk:root,binding=value,attachment=unattached,size_mib=64,allow_global_ref=false",
        )
        .unwrap();
        assert_eq!(r.binding, Some(Binding::Value));
        assert_eq!(r.attachment, Some(Attachment::Unattached));
        assert_eq!(r.size_mib, Some(64));
        assert!(!r.allow_global_ref);
        let r = parse_resource("device:rng,class=entropy").unwrap();
        assert_eq!(
            (r.kind, r.class.as_deref()),
            (ResourceKind::Device, Some("entropy"))
        );
        let r = parse_resource("endpoint:web,port=8080").unwrap();
        assert_eq!(r.port, Some(8080));
        assert_eq!(
            parse_resource("scratch:cache").unwrap().kind,
            ResourceKind::Scratch
        );
    }

    #[test]
    fn bad_specs_are_refused_with_a_sentence() {
        for (spec, error) in [
            ("root", "\"root\" is not KIND:NAME[,key=value...] (e.g. disk:root,size_mib=64)"),
            ("volume:root", "unknown resource kind \"volume\": use disk, endpoint, scratch or device"),
            ("disk:", "resource \"disk:\" has no name after disk:"),
            ("disk:size_mib=4", "resource \"disk:size_mib=4\" has no name after disk:"),
            ("disk:root,64", "\"64\" in resource root is not key=value (keys: binding, attachment, size_mib, class, allow_global_ref or port)"),
            ("disk:root,", "\"\" in resource root is not key=value (keys: binding, attachment, size_mib, class, allow_global_ref or port)"),
            ("disk:root,size=4", "unknown key \"size\" in resource root: use binding, attachment, size_mib, class, allow_global_ref or port"),
            ("disk:root,size_mib=big", "size_mib=\"big\" in resource root: not a whole number of MiB"),
            ("disk:root,size_mib=1,size_mib=2", "resource root sets size_mib twice"),
            ("disk:root,binding=name", "binding=\"name\" in resource root: use identifier, value or type"),
            ("disk:root,attachment=glued", "attachment=\"glued\" in resource root: use unattached, fastened or fixed"),
            ("device:gpu0,class=", "class=\"\" in resource gpu0: the class is empty"),
            ("disk:root,allow_global_ref=maybe", "allow_global_ref=\"maybe\" in resource root: use true or false"),
            ("endpoint:web,port=70000", "port=\"70000\" in resource web: not a TCP port (0-65535)"),
        ] {
            assert_eq!(parse_resource(spec).unwrap_err(), error, "{spec}");
        }
    }

    #[test]
    fn bytes_read_well() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(4 << 20), "4.0 MiB");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
    }
}
