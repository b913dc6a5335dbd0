//! IncrementalAlterConfigs, which the rdkafka crate does not wrap (its `alter_configs` is the
//! legacy API, which replaces a topic's settings whole and which newer brokers drop): one of
//! the two places tally calls librdkafka's C API itself (with [`super::commit`]).

use std::ffi::{CStr, CString};
use std::time::Duration;

use rdkafka::admin::AdminClient;
use rdkafka::bindings as rd;
use rdkafka::client::DefaultClientContext;

/// Sets `settings` on `topic`, leaving its other settings as they are. The error says why not.
pub fn set_topic_settings(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    settings: &[(&str, &str)],
    timeout: Duration,
) -> Result<(), String> {
    let c = |s: &str| CString::new(s).map_err(|_| format!("`{s}` holds a NUL byte"));
    let name = c(topic)?;
    let pairs: Vec<(CString, CString)> = settings.iter().map(|(k, v)| Ok((c(k)?, c(v)?))).collect::<Result<_, String>>()?;
    let rk = admin.inner().native_ptr();
    let timeout_ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: every object is created here, used while alive and destroyed once; the strings
    // outlive the calls that read them; the client handle is alive as long as `admin`.
    unsafe {
        let resource = rd::rd_kafka_ConfigResource_new(rd::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_TOPIC, name.as_ptr());
        if resource.is_null() {
            return Err(format!("`{topic}` is not a topic name librdkafka takes"));
        }
        for (k, v) in &pairs {
            let err = rd::rd_kafka_ConfigResource_add_incremental_config(
                resource,
                k.as_ptr(),
                rd::rd_kafka_AlterConfigOpType_t::RD_KAFKA_ALTER_CONFIG_OP_TYPE_SET,
                v.as_ptr(),
            );
            if !err.is_null() {
                rd::rd_kafka_error_destroy(err);
                rd::rd_kafka_ConfigResource_destroy(resource);
                return Err(format!("setting {} is not accepted", k.to_string_lossy()));
            }
        }
        let options = rd::rd_kafka_AdminOptions_new(rk, rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_INCREMENTALALTERCONFIGS);
        let mut errstr = [0 as std::os::raw::c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(options, timeout_ms, errstr.as_mut_ptr(), errstr.len());
        let queue = rd::rd_kafka_queue_new(rk);
        let mut resources = [resource];
        rd::rd_kafka_IncrementalAlterConfigs(rk, resources.as_mut_ptr(), 1, options, queue);
        let event = rd::rd_kafka_queue_poll(queue, timeout_ms.saturating_add(1000));
        let outcome = outcome_of(event);
        if !event.is_null() {
            rd::rd_kafka_event_destroy(event);
        }
        rd::rd_kafka_queue_destroy(queue);
        rd::rd_kafka_AdminOptions_destroy(options);
        rd::rd_kafka_ConfigResource_destroy(resource);
        outcome
    }
}

/// What the result event says of the one resource altered.
///
/// # Safety
/// `event` is null or a live event of an IncrementalAlterConfigs request.
unsafe fn outcome_of(event: *mut rd::rd_kafka_event_t) -> Result<(), String> {
    if event.is_null() {
        return Err("no answer in time".into());
    }
    let text = |p: *const std::os::raw::c_char| if p.is_null() { String::new() } else { CStr::from_ptr(p).to_string_lossy().into_owned() };
    if rd::rd_kafka_event_error(event) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        return Err(text(rd::rd_kafka_event_error_string(event)));
    }
    let result = rd::rd_kafka_event_IncrementalAlterConfigs_result(event);
    if result.is_null() {
        return Err("an answer of another request".into());
    }
    let mut n = 0usize;
    let resources = rd::rd_kafka_IncrementalAlterConfigs_result_resources(result, &mut n);
    for i in 0..n {
        let r = *resources.add(i);
        let err = rd::rd_kafka_ConfigResource_error(r);
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(format!("{} ({})", text(rd::rd_kafka_ConfigResource_error_string(r)), text(rd::rd_kafka_err2str(err))));
        }
    }
    Ok(())
}
