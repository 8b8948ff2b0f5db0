"""Every journald MESSAGE_ID gatewayd emits, defined in this one module.

An operator alerts on these ids (``journalctl MESSAGE_ID=...``), so an id never changes once released.
docs/messages.md documents each one; a test keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Priority(IntEnum):
    """syslog priorities, as journald's PRIORITY= field uses them."""

    ERR = 3
    WARNING = 4
    NOTICE = 5
    INFO = 6
    DEBUG = 7


@dataclass(frozen=True)
class Entry:
    name: str
    id: str  # 128-bit id, 32 lowercase hex digits, as sd-id128 formats it
    priority: Priority
    summary: str
    action: str  # what an operator should do; "" when nothing
    fields: str = ""  # the event's own journal fields, for the docs


STARTED = Entry(
    "STARTED",
    "4424b38321b54e6284e8d941ce335ae1",
    Priority.NOTICE,
    "gatewayd started all its components; it tells systemd it is ready (READY=1) right after this.",
    "",
    fields="GATEWAYD_THING_NAME",
)
STOPPING = Entry(
    "STOPPING",
    "ff238b37fe304f88bcd5ed36e8752adf",
    Priority.NOTICE,
    "gatewayd received SIGTERM or SIGINT and is closing its connections.",
    "",
)
STOPPED = Entry(
    "STOPPED",
    "b22034a63fa5412f961e84697eacad93",
    Priority.NOTICE,
    "gatewayd finished a clean shutdown.",
    "",
)
CONFIG_INVALID = Entry(
    "CONFIG_INVALID",
    "5433ee6686064fe093cd41e0cf6789c5",
    Priority.ERR,
    "The configuration is invalid at start; gatewayd exits with status 78 and systemd does not restart it.",
    "Fix every FILE:section.key line logged with this message, check with "
    "`gatewayd check-config --config PATH`, then start the service again.",
    fields="none; MESSAGE holds one FILE:section.key: problem (one entry per problem)",
)
CONFIG_RELOADED = Entry(
    "CONFIG_RELOADED",
    "f888cd108c4b40578400b26460a642c9",
    Priority.NOTICE,
    "SIGHUP (systemctl reload): the configuration was re-read and the live keys were applied.",
    "",
    fields="GATEWAYD_APPLIED (keys applied live), GATEWAYD_RESTART (keys that need a restart)",
)
CONFIG_RELOAD_REFUSED = Entry(
    "CONFIG_RELOAD_REFUSED",
    "c219c94109484390859b46b4ca7d38b9",
    Priority.ERR,
    "SIGHUP: the new configuration is invalid, so it was refused; the running configuration stays in force.",
    "Fix the problems logged with this message, then reload again.",
    fields="GATEWAYD_CONFIG_KEY (one entry per problem)",
)
CONFIG_RESTART_REQUIRED = Entry(
    "CONFIG_RESTART_REQUIRED",
    "b04cdcb0692e45d18bbedefdd0ded8d1",
    Priority.WARNING,
    "SIGHUP: a changed key cannot be applied live; the running value stays until the service restarts. "
    "The key is in the GATEWAYD_CONFIG_KEY field.",
    "Restart the service (`systemctl restart gatewayd`) when convenient.",
    fields="GATEWAYD_CONFIG_KEY",
)
FATAL_ERROR = Entry(
    "FATAL_ERROR",
    "4a318c3303c441059a56d618d2fec6ea",
    Priority.ERR,
    "gatewayd stopped because of an unexpected error; systemd restarts it (Restart=on-failure).",
    "Read the traceback in this entry and report it with the gatewayd version.",
)

UPLINK_CONNECTED = Entry(
    "UPLINK_CONNECTED",
    "73e8ecf3f1c14611ba9a302e37e9ac4b",
    Priority.NOTICE,
    "The gateway connected to AWS IoT Core with its certificate (mutual TLS, CONNACK accepted).",
    "",
    fields="GATEWAYD_CHILD_PID (the uplink process)",
)
UPLINK_DISCONNECTED = Entry(
    "UPLINK_DISCONNECTED",
    "75fd1d7931d542bb9c140db7169b6408",
    Priority.WARNING,
    "The connection to AWS IoT Core was lost; the gateway reconnects with backoff and keeps every message "
    "not yet acknowledged. The reason is in GATEWAYD_REASON.",
    "None if it reconnects; otherwise check the network and GATEWAYD_REASON.",
    fields="GATEWAYD_REASON",
)
UPLINK_CONNECT_FAILED = Entry(
    "UPLINK_CONNECT_FAILED",
    "450e16a5a66b448a9d664aa2a6e2f0f7",
    Priority.ERR,
    "A connection attempt to AWS IoT Core failed (TLS, certificate, refused CONNECT, network). "
    "GATEWAYD_REASON says why; the gateway retries with capped exponential backoff.",
    "Act on GATEWAYD_REASON: a server certificate rejected by the validation mode, a wrong endpoint, or a "
    "certificate AWS IoT does not accept (inactive, revoked, policy) will not fix itself.",
    fields="GATEWAYD_REASON",
)
UPLINK_BLOCKED = Entry(
    "UPLINK_BLOCKED",
    "0415ad79d5d041d79e27c964b4104e92",
    Priority.ERR,
    "The gateway cannot try to connect: no certificate installed, the certificate expired or does not match "
    "its key, or the TPM is unavailable. GATEWAYD_REASON says which; it retries on its own.",
    "Follow GATEWAYD_REASON, e.g. `gatewayctl identity create-key`, `create-csr`, `install-certificate`.",
    fields="GATEWAYD_REASON",
)
TRUST_ROOT_EXPIRING = Entry(
    "TRUST_ROOT_EXPIRING",
    "6e085e281c00443dbd777ad284bfa087",
    Priority.WARNING,
    "A root CA the validation mode trusts expires within upstream.root_expiry_warning_days "
    "(GATEWAYD_ROOT, GATEWAYD_NOT_AFTER, GATEWAYD_DAYS_LEFT).",
    "Update ca-certificates, or move to a validation mode whose roots are current: "
    "gatewayctl trust update --mode all (proven by a trial connection before it is used).",
    fields="GATEWAYD_ROOT, GATEWAYD_NOT_AFTER, GATEWAYD_DAYS_LEFT",
)
INSECURE_KEY_BACKEND = Entry(
    "INSECURE_KEY_BACKEND",
    "fdbf5799a6ab49988d12274970d952e2",
    Priority.WARNING,
    'identity.key_backend is "file": the private key is a file, not protected by a TPM. Anyone who can read '
    "it can impersonate this gateway. Logged at every start.",
    'Use key_backend = "tpm" on hardware with a TPM.',
)
LEGACY_TRUST = Entry(
    "LEGACY_TRUST",
    "df4bf252c71c46a481321308edddbea4",
    Priority.WARNING,
    "validation_mode is legacy: the endpoint is authenticated by a user-supplied VeriSign-era root. AWS no "
    "longer supports legacy (non-ATS) endpoints. Logged at every start.",
    "Move to the ATS endpoint (`aws iot describe-endpoint --endpoint-type iot:Data-ATS`), mode rsa or ecc.",
)
DEV_TRUST_CATALOG = Entry(
    "DEV_TRUST_CATALOG",
    "4fff441bd2ac48c8926529797b33100a",
    Priority.WARNING,
    "GATEWAYD_DEV_ROOT_CATALOG is set: the Amazon root pins are replaced by a development catalog "
    "(tests and the demo). Never in production.",
    "Remove GATEWAYD_DEV_ROOT_CATALOG from the daemon's environment.",
)
IDENTITY_CHANGED = Entry(
    "IDENTITY_CHANGED",
    "d5695610d12044eeb14c37d13b79e297",
    Priority.NOTICE,
    "A key was created or a certificate installed "
    "(GATEWAYD_ACTION, GATEWAYD_CERTIFICATE_ID, GATEWAYD_NOT_AFTER).",
    "",
    fields="GATEWAYD_ACTION, GATEWAYD_KEY or GATEWAYD_CERTIFICATE_ID and GATEWAYD_NOT_AFTER",
)

SENSOR_CONNECTED = Entry(
    "SENSOR_CONNECTED",
    "1c3350bfbdc24d149b618d5d237f3fa4",
    Priority.INFO,
    "A sensor connected to the gateway's listener.",
    "",
    fields="GATEWAYD_CLIENT_ID, GATEWAYD_CERTIFICATE_ID",
)
SENSOR_DISCONNECTED = Entry(
    "SENSOR_DISCONNECTED",
    "7e4d5e72ac2d493f91eb6cf240b2621c",
    Priority.INFO,
    "A sensor's connection ended; GATEWAYD_REASON is the MQTT 5.0 reason code (0x00: it disconnected).",
    "",
    fields="GATEWAYD_CLIENT_ID, GATEWAYD_REASON",
)
SENSOR_REFUSED = Entry(
    "SENSOR_REFUSED",
    "b6212cfc5c584b7fa5d25b8021bab179",
    Priority.WARNING,
    "A sensor's CONNECT was refused (client id rules, registry, connection limit); GATEWAYD_REASON says why.",
    "If the sensor should be admitted, check its client id against its certificate's CN, and its "
    "registry status.",
    fields="GATEWAYD_CLIENT_ID, GATEWAYD_CERTIFICATE_ID, GATEWAYD_REASON",
)

SENSOR_CONNECTION_FAILED = Entry(
    "SENSOR_CONNECTION_FAILED",
    "5418aceef99e4ec0858310df574556b0",
    Priority.ERR,
    "gatewayd failed while handling a sensor's connection (a bug): that one connection was closed with "
    "GATEWAYD_REASON (0x80, unspecified error); other sensors are not affected. A failure while deciding a "
    "CONNECT leaves the sensor's stored session as it was before that CONNECT.",
    "Report it with this journal entry (it carries the traceback). The sensor reconnects as usual.",
    fields="GATEWAYD_CLIENT_ID, GATEWAYD_REASON, GATEWAYD_ERROR",
)

CERTIFICATE_AUTO_REGISTERED = Entry(
    "CERTIFICATE_AUTO_REGISTERED",
    "e59be6f34bd84d8697dce0c2f4f06d58",
    Priority.NOTICE,
    "A sensor presented an unregistered certificate from a registered CA with auto-registration enabled; it "
    "was recorded PENDING_ACTIVATION (refused) or, with downstream.auto_activate, ACTIVE (admitted).",
    "To admit a PENDING_ACTIVATION certificate: gatewayctl update-certificate --certificate-id ID "
    "--new-status ACTIVE.",
    fields="GATEWAYD_CERTIFICATE_ID, GATEWAYD_CA_CERTIFICATE_ID, GATEWAYD_STATUS, GATEWAYD_CLIENT_ID",
)
REGISTRY_CHANGED = Entry(
    "REGISTRY_CHANGED",
    "59fcee0d24bc49719678dfee4205955e",
    Priority.NOTICE,
    "A registry command changed a certificate or CA certificate (GATEWAYD_COMMAND names it, as the AWS CLI "
    "does).",
    "",
    fields="GATEWAYD_COMMAND, GATEWAYD_CERTIFICATE_ID, GATEWAYD_STATUS",
)
SENSOR_ADMISSION_REVOKED = Entry(
    "SENSOR_ADMISSION_REVOKED",
    "d6a10210d043420eade8410c218601d9",
    Priority.NOTICE,
    "A connected sensor was disconnected because its certificate or its CA is no longer ACTIVE.",
    "",
    fields="GATEWAYD_CLIENT_ID, GATEWAYD_CERTIFICATE_ID, GATEWAYD_REASON",
)
CONTROL_DENIED = Entry(
    "CONTROL_DENIED",
    "f547d19c113b44df8e8976c22465f96d",
    Priority.WARNING,
    "A process that is neither root, gatewayd's own user nor in the control group connected to the control "
    "socket and was refused.",
    "Add the user to the group named by gateway.control_group if it should use gatewayctl.",
    fields="GATEWAYD_PEER_UID, GATEWAYD_PEER_PID",
)

RENEWAL_SCHEDULED = Entry(
    "RENEWAL_SCHEDULED",
    "2596c0ed56d64c3c980ee2fa0d1b2c65",
    Priority.INFO,
    "The next renewal of the gateway's certificate is due at GATEWAYD_DUE (from renewal.renew_before, or the "
    "retry backoff after a failure); logged whenever that time changes.",
    "",
    fields="GATEWAYD_DUE, GATEWAYD_CERTIFICATE_ID, GATEWAYD_NOT_AFTER",
)
RENEWAL_STARTED = Entry(
    "RENEWAL_STARTED",
    "6ec98490f2bb4f79af36396d3a645549",
    Priority.NOTICE,
    "A renewal of the gateway's certificate started (due, or `gatewayctl identity renew`).",
    "",
    fields="GATEWAYD_ISSUER, GATEWAYD_CERTIFICATE_ID",
)
RENEWAL_ISSUED = Entry(
    "RENEWAL_ISSUED",
    "35406479ca404b28bf8b81e8d1b8aa2b",
    Priority.NOTICE,
    "The issuer delivered a certificate for the new key; it is staged, not live, until a trial connection"
    " proves it.",
    "",
    fields="GATEWAYD_CERTIFICATE_ID, GATEWAYD_NOT_BEFORE, GATEWAYD_NOT_AFTER",
)
RENEWAL_TRIAL_FAILED = Entry(
    "RENEWAL_TRIAL_FAILED",
    "fccc691baa464b56bbbfc7423461fc11",
    Priority.WARNING,
    "The trial connection with the staged certificate failed; the staged certificate and its key are "
    "discarded and the current identity stays live.",
    "Check GATEWAYD_REASON: the issuer may deliver certificates AWS IoT does not accept (not registered "
    "or not active, wrong CA, policy).",
    fields="GATEWAYD_CERTIFICATE_ID, GATEWAYD_REASON",
)
RENEWAL_PROMOTED = Entry(
    "RENEWAL_PROMOTED",
    "ce00d0eac7da4b869d8b6ff357872963",
    Priority.NOTICE,
    "A renewed certificate passed its trial and is live; the previous one is kept until the new one has "
    "connected.",
    "",
    fields="GATEWAYD_CERTIFICATE_ID, GATEWAYD_NOT_AFTER",
)
RENEWAL_ROLLED_BACK = Entry(
    "RENEWAL_ROLLED_BACK",
    "5d7d9cffea774762a87eec4beb59c79d",
    Priority.ERR,
    "The promoted certificate did not connect within renewal.rollback_window; the previous version is "
    "live again and the renewal will be retried.",
    "Find out why the new certificate could not connect (GATEWAYD_REASON, and the UPLINK_CONNECT_FAILED "
    "entries before this one).",
    fields="GATEWAYD_REASON, GATEWAYD_VERSION",
)
IDENTITY_EVENT = Entry(
    "IDENTITY_EVENT",
    "0b13dc27d9b04a0f91038d41dee0fb12",
    Priority.INFO,
    "The gateway's certificate changed (promoted after a renewal, rolled back, abandoned after a failed "
    "trial, or installed by hand); the identity event naming the certificate in use and the one no longer "
    "used was queued for renewal.identity_event_topic.",
    "Nothing on the gateway. In AWS IoT, deactivate the certificate no longer used "
    "(GATEWAYD_UNUSED_CERTIFICATE_ID): the rotation recipe in identity.md (the documentation) does it "
    "with a rule and a Lambda.",
    fields="GATEWAYD_EVENT, GATEWAYD_CERTIFICATE_ID, GATEWAYD_UNUSED_CERTIFICATE_ID",
)

RENEWAL_FAILED = Entry(
    "RENEWAL_FAILED",
    "b65fac4ca24c4c7dac4d7dfcd0c7f8dd",
    Priority.ERR,
    "A renewal failed before anything went live (issuer error, unusable certificate, failed trial, "
    "restart mid-way); what it made was discarded; it is retried after GATEWAYD_RETRY_IN seconds.",
    "If it keeps failing, fix the cause in GATEWAYD_REASON before the certificate expires.",
    fields="GATEWAYD_REASON, GATEWAYD_RETRY_IN",
)

TRUST_UPDATED = Entry(
    "TRUST_UPDATED",
    "0020c608aca0421ea43a257fa04a6996",
    Priority.NOTICE,
    "`gatewayctl trust update` replaced the uplink's CA bundle after a trial connection proved it; the "
    "uplink reconnected with it.",
    "",
    fields="GATEWAYD_MODE, GATEWAYD_ROOTS",
)
TRUST_UPDATE_FAILED = Entry(
    "TRUST_UPDATE_FAILED",
    "e72d37e79c784a00a63402f090089723",
    Priority.WARNING,
    "A trust update was refused (the trial connection with the new bundle failed) or rolled back (the "
    "uplink did not connect with it); the previous bundle is in use.",
    "Check that the new mode's roots include the one that signed the endpoint's certificate.",
    fields="GATEWAYD_MODE, GATEWAYD_REASON",
)
SPOOL_DROPPED = Entry(
    "SPOOL_DROPPED",
    "575f1bf6cfe544b7a79f2ed64ef39218",
    Priority.WARNING,
    "Messages from sensors were dropped before reaching AWS IoT: to make room in a full spool (QoS 0 "
    "messages; QoS 1 too only with spool.when_full = drop-oldest), or because they were older than "
    "spool.max_age. Logged at most every 10 seconds with the counts since the last such line; the totals "
    "are in gatewayctl status.",
    "Find out why the uplink cannot keep up (offline, throttled: see gatewayctl status), or raise "
    "spool.max_bytes / spool.max_age.",
    fields="GATEWAYD_REASON, GATEWAYD_DROPPED_QOS0, GATEWAYD_DROPPED_QOS1, GATEWAYD_DROPPED_EXPIRED",
)
SPOOL_FULL = Entry(
    "SPOOL_FULL",
    "f03cd78115984ed3ba3c66ca772df8f4",
    Priority.WARNING,
    "The spool is full of QoS 1 messages: sensors' QoS 1/2 publishes are held back (their PUBACK/PUBREC "
    "waits until the uplink frees room), so sensors slow down; nothing acknowledged is lost.",
    "Restore the uplink, or raise spool.max_bytes.",
    fields="GATEWAYD_SPOOL_BYTES, GATEWAYD_SPOOL_MESSAGES",
)
CONNECTIONS_LIMITED = Entry(
    "CONNECTIONS_LIMITED",
    "be287c52a40844188f8034b9257662ac",
    Priority.WARNING,
    "New connections to the sensor listener were closed at once, before any MQTT exchange: too many were "
    "pending (accepted, TLS handshake or CONNECT not complete) in all (downstream.max_pending_connections) "
    "or from one address (downstream.max_pending_per_address). Logged at most every 10 s with the count. "
    "Sensors see their connection closed and try again.",
    "A connection flood or a scan from the LAN: find the address in GATEWAYD_ADDRESS and block it. A fleet "
    "reconnecting at once behind one NAT address: raise max_pending_per_address.",
    fields="GATEWAYD_REFUSED, GATEWAYD_PENDING, GATEWAYD_ADDRESS",
)

CLOSED_BEFORE_CONNECT = Entry(
    "CLOSED_BEFORE_CONNECT",
    "d01d216c3c534b42b22665dc03b720f4",
    Priority.INFO,
    "Connections to the sensor listener ended before their CONNECT was accepted: no CONNECT within "
    "downstream.connect_timeout of the accept (the TLS handshake included), a TLS handshake that failed, or "
    "a malformed first packet. Logged at most every 10 s with the count (GATEWAYD_COUNT) and the last one's "
    "address and reason; refused CONNECTs are SENSOR_REFUSED.",
    "A steady stream from one address is a scan or a slow-loris: block it. From a sensor: check its TLS "
    "settings (it must trust the gateway's local CA) and that it sends CONNECT at once.",
    fields="GATEWAYD_COUNT, GATEWAYD_ADDRESS, GATEWAYD_REASON",
)

SUBSCRIPTION_REFUSED = Entry(
    "SUBSCRIPTION_REFUSED",
    "d1d932112d1742448e4012ee3eb17908",
    Priority.WARNING,
    "A sensor's subscription was refused for a bound: its session already holds "
    "downstream.max_subscriptions_per_sensor subscriptions, or max_upstream_subscriptions_per_sensor of "
    "those forwarded to AWS IoT (SUBACK 0x97 Quota exceeded; 3.1.1: 0x80), or the filter sent upstream "
    "breaks AWS IoT's topic rules (0x8F Topic filter invalid; 3.1.1: 0x80). A policy refusal is logged "
    "without this id.",
    "A sensor subscribing to ever more filters is misbehaving; if it needs them, raise the bound.",
    fields="GATEWAYD_CLIENT_ID, GATEWAYD_TOPIC_FILTER, GATEWAYD_REASON",
)

RETAINED_LIMITED = Entry(
    "RETAINED_LIMITED",
    "a9d3b1cdf39a40ce8d9503a70eb50756",
    Priority.WARNING,
    "A sensor's retained message was not kept for later subscribers (it was delivered and forwarded all the "
    "same): downstream.max_retained_messages, max_retained_bytes or max_retained_bytes_per_sensor was "
    "reached. Logged at most every 10 s; GATEWAYD_REFUSED counts them since the start.",
    "A sensor retaining ever more topics is misbehaving; if the fleet needs them, raise the bounds.",
    fields="GATEWAYD_CLIENT_ID, GATEWAYD_TOPIC, GATEWAYD_REASON, GATEWAYD_REFUSED",
)

CLOCK_UNSYNCHRONIZED = Entry(
    "CLOCK_UNSYNCHRONIZED",
    "3f2546e1af7c4e27bd2ce66c37247e18",
    Priority.WARNING,
    "The wall clock is not known to be synchronized (a Raspberry Pi has no battery-backed clock: until NTP "
    "sets it, it is where the last shutdown left it). Until it is: no certificate renewal starts from the "
    "clock alone, the gateway's own certificate's dates do not stop the uplink, the local CA issues listener "
    "certificates valid from 30 days back, and readings' ages are measured without the wall clock.",
    "Nothing if NTP will reach its servers soon. Otherwise check the time service (`timedatectl "
    "timesync-status`), the network and UDP port 123; `[time] synchronized` names the source used.",
    fields="GATEWAYD_SOURCE, GATEWAYD_WALL_CLOCK",
)

CLOCK_SYNCHRONIZED = Entry(
    "CLOCK_SYNCHRONIZED",
    "0da649487ce3427f9fcf6dd523237c5f",
    Priority.INFO,
    "The wall clock is synchronized (again): renewals due by the clock go ahead and a connection that "
    "failed for certificate dates is tried again at once.",
    "",
    fields="GATEWAYD_SOURCE, GATEWAYD_WALL_CLOCK",
)

CLOCK_JUMPED = Entry(
    "CLOCK_JUMPED",
    "024585a9b01245d9878eb538e08eb614",
    Priority.NOTICE,
    "The wall clock jumped (NTP set a stale clock, or someone set the time): logged once per jump, with its "
    "size and direction. Readings' ages and the daemon's timers do not follow the wall clock, so nothing is "
    "dropped or fired by it; a listener certificate issued before a jump of over an hour is issued again.",
    "Nothing for one jump after boot. Repeated jumps: two time sources disagree (an RTC HAT and NTP, or two "
    "NTP clients); keep one.",
    fields="GATEWAYD_JUMP_SECONDS, GATEWAYD_WALL_CLOCK",
)

CLOCK_SUSPECT = Entry(
    "CLOCK_SUSPECT",
    "c54066cc3b044a4aa7f2d9e25e56a744",
    Priority.WARNING,
    "A certificate was refused for its dates (not yet valid, or expired) while the wall clock is not known "
    "to be synchronized: most likely the clock is wrong, not the certificate. The uplink tries again as soon "
    "as the clock is synchronized.",
    "Get the clock synchronized (see CLOCK_UNSYNCHRONIZED). If it is right, the certificate's dates are "
    "the problem: renew or replace it.",
    fields="GATEWAYD_WALL_CLOCK, GATEWAYD_REASON",
)

SPOOL_REPAIRED = Entry(
    "SPOOL_REPAIRED",
    "d95d426a6b5b4d4fbcf20990055425fa",
    Priority.WARNING,
    "At start, a spool segment file ended in a record cut short or failing its checksum (a power cut during "
    "a write, or a damaged card): that tail was cut off. A cut-short record was never acknowledged to its "
    "sensor, so nothing acknowledged is lost by a power cut; a checksum failure inside a file means the card "
    "damaged data.",
    "Nothing after a power cut. Repeated lines without power cuts: check the SD card (dmesg for I/O errors).",
    fields="GATEWAYD_DETAIL",
)
SPOOL_MIGRATED = Entry(
    "SPOOL_MIGRATED",
    "13e1c9287efd4b36b0b5ba4dbecea0ce",
    Priority.NOTICE,
    "At the first start after an upgrade, the messages waiting in the SQLite spool of an earlier version "
    "(state_dir/spool.db) were moved into the spool's segment files, in order, and spool.db was removed.",
    "",
    fields="GATEWAYD_SPOOL_MESSAGES, GATEWAYD_SPOOL_BYTES",
)
SPOOL_BACKLOG = Entry(
    "SPOOL_BACKLOG",
    "a4bf03e305a24ba0b7109393cdc108f5",
    Priority.INFO,
    "Messages are waiting in the spool for the uplink: logged once a minute while any wait, with the depth, "
    "the bytes, the oldest message's age, the uplink's publish rate and whether the quota holds it back.",
    "Nothing, while the uplink is connected and the backlog shrinks; otherwise see why the uplink cannot "
    "connect or keep up (gatewayctl status).",
    fields="GATEWAYD_SPOOL_MESSAGES, GATEWAYD_SPOOL_BYTES, GATEWAYD_OLDEST_AGE_SECONDS, "
    "GATEWAYD_PUBLISH_RATE, GATEWAYD_THROTTLED",
)
UPLINK_THROTTLED = Entry(
    "UPLINK_THROTTLED",
    "2dc4c614b948489bae5409ac3fefd8e7",
    Priority.INFO,
    "The uplink reached a per-connection quota (upstream.quota: publishes or bytes per second) and holds "
    "messages back in the spool so AWS IoT does not throttle or disconnect the gateway. Logged at most once "
    "a minute.",
    "If it persists, the sensors send more than one connection may carry: batch readings "
    "([[forwarding.batch]]), or ask AWS for a higher quota and raise upstream.quota.",
    fields="GATEWAYD_PUBLISH_RATE",
)

TPM_ARRIVED = Entry(
    "TPM_ARRIVED",
    "0073f0de700149c7a426e6209807f3a8",
    Priority.NOTICE,
    "udev announced the TPM device (identity.tpm_device): the uplink connects now instead of waiting.",
    "",
    fields="GATEWAYD_DEVICE",
)
TPM_REMOVED = Entry(
    "TPM_REMOVED",
    "4b4059e494cd418094594dbe494af16a",
    Priority.WARNING,
    "udev reported the TPM device gone: the uplink disconnected cleanly and waits for it (status "
    "waiting-for-tpm); sensors' messages are spooled meanwhile.",
    "Check the TPM module and its driver (dmesg, `ls /dev/tpm*`); gatewayd resumes by itself when udev "
    "announces it again.",
    fields="GATEWAYD_DEVICE",
)
NETWORK_CHANGED = Entry(
    "NETWORK_CHANGED",
    "506ada7de32f4f41ba19d97995b480fe",
    Priority.INFO,
    "An interface, link or address changed: an uplink that is not connected tries again at once instead of "
    "after its backoff; a connection from an address that is gone is dropped and made again.",
    "",
    fields="GATEWAYD_REASON (what changed), GATEWAYD_ADDRESSES (the host's addresses now)",
)
LISTENER_CERT_REISSUED = Entry(
    "LISTENER_CERT_REISSUED",
    "8366a86238474d6f8830a14eb63555ec",
    Priority.NOTICE,
    "The local CA issued the sensor listener a new server certificate: the gateway's addresses changed (it "
    "names them), or the wall clock was set (a jump of over an hour, or synchronized after the certificate "
    "was made by an unsynchronized clock). New connections get it, connected sensors stay connected.",
    "",
    fields="GATEWAYD_ADDRESSES, GATEWAYD_REASON",
)
HARDWARE_EVENTS_UNAVAILABLE = Entry(
    "HARDWARE_EVENTS_UNAVAILABLE",
    "b27d868cb7d04affb4912ec8d1f3b777",
    Priority.WARNING,
    "udev or rtnetlink events cannot be received: gatewayd falls back to what it checks by itself (the TPM "
    "device node at every connection attempt, the backoff for reconnects); serial sensors are not opened.",
    "Run gatewayd where udev runs (systemd-udevd) and allow AF_NETLINK (the packaged unit does).",
    fields="GATEWAYD_REASON",
)
SERIAL_OPENED = Entry(
    "SERIAL_OPENED",
    "8feac67ea25e4d3b954555776d3d3705",
    Priority.INFO,
    "A tty matching a [[downstream.serial]] rule was plugged in (or present at start) and opened; its "
    "records are published as the rule's sensor.",
    "",
    fields="GATEWAYD_CLIENT_ID, GATEWAYD_DEVICE",
)
SERIAL_CLOSED = Entry(
    "SERIAL_CLOSED",
    "24d07386c2eb49dc93e8276482085bf2",
    Priority.INFO,
    "A serial sensor's tty was closed: unplugged, gone, or gatewayd is stopping. A record not finished by a "
    "newline is discarded.",
    "",
    fields="GATEWAYD_CLIENT_ID, GATEWAYD_DEVICE, GATEWAYD_REASON",
)
SERIAL_OPEN_FAILED = Entry(
    "SERIAL_OPEN_FAILED",
    "1cd1f4237e304ccb9480e5dd36d90745",
    Priority.ERR,
    "A tty matching a [[downstream.serial]] rule could not be opened or configured.",
    "Check that gatewayd may open it: the packaged unit allows /dev/ttyUSB* and /dev/ttyACM* and puts "
    "gatewayd in group dialout; other devices need a DeviceAllow= drop-in.",
    fields="GATEWAYD_DEVICE, GATEWAYD_REASON",
)
SERIAL_RECORD_DROPPED = Entry(
    "SERIAL_RECORD_DROPPED",
    "5504e6e7deeb4e1ab77fbdcc1a3001a0",
    Priority.WARNING,
    "Records from a serial sensor were dropped: longer than max_record_bytes, not JSON (format json), "
    "refused by the policy or the spool, or the sensor's certificate is not ACTIVE. The first drop is logged "
    "at once; later ones are counted and logged with the next drop at least 10 s later, or when the port "
    "closes.",
    "Check the sensor's output (baud rate and line settings, record format) and the rule.",
    fields="GATEWAYD_CLIENT_ID, GATEWAYD_DEVICE, GATEWAYD_REASON, GATEWAYD_DROPPED",
)

ALL: tuple[Entry, ...] = (
    STARTED,
    STOPPING,
    STOPPED,
    CONFIG_INVALID,
    CONFIG_RELOADED,
    CONFIG_RELOAD_REFUSED,
    CONFIG_RESTART_REQUIRED,
    FATAL_ERROR,
    UPLINK_CONNECTED,
    UPLINK_DISCONNECTED,
    UPLINK_CONNECT_FAILED,
    UPLINK_BLOCKED,
    TRUST_ROOT_EXPIRING,
    INSECURE_KEY_BACKEND,
    LEGACY_TRUST,
    DEV_TRUST_CATALOG,
    IDENTITY_CHANGED,
    SENSOR_CONNECTED,
    SENSOR_DISCONNECTED,
    SENSOR_REFUSED,
    SENSOR_CONNECTION_FAILED,
    CERTIFICATE_AUTO_REGISTERED,
    REGISTRY_CHANGED,
    SENSOR_ADMISSION_REVOKED,
    CONTROL_DENIED,
    RENEWAL_SCHEDULED,
    RENEWAL_STARTED,
    RENEWAL_ISSUED,
    RENEWAL_TRIAL_FAILED,
    RENEWAL_PROMOTED,
    RENEWAL_ROLLED_BACK,
    IDENTITY_EVENT,
    RENEWAL_FAILED,
    TRUST_UPDATED,
    TRUST_UPDATE_FAILED,
    SPOOL_DROPPED,
    SPOOL_FULL,
    SPOOL_BACKLOG,
    SPOOL_REPAIRED,
    SPOOL_MIGRATED,
    UPLINK_THROTTLED,
    CONNECTIONS_LIMITED,
    CLOSED_BEFORE_CONNECT,
    SUBSCRIPTION_REFUSED,
    RETAINED_LIMITED,
    CLOCK_UNSYNCHRONIZED,
    CLOCK_SYNCHRONIZED,
    CLOCK_JUMPED,
    CLOCK_SUSPECT,
    TPM_ARRIVED,
    TPM_REMOVED,
    NETWORK_CHANGED,
    LISTENER_CERT_REISSUED,
    HARDWARE_EVENTS_UNAVAILABLE,
    SERIAL_OPENED,
    SERIAL_CLOSED,
    SERIAL_OPEN_FAILED,
    SERIAL_RECORD_DROPPED,
)


def extra(message: Entry, **fields: object) -> dict[str, object]:
    """`extra=` for a logging call: attaches the MESSAGE_ID, the message's own syslog priority (journald's
    PRIORITY, e.g. NOTICE for a record logged at INFO) and structured fields to the record."""
    return {
        "message_id": message.id,
        "message_name": message.name,
        "journal_priority": int(message.priority),
        "fields": fields,
    }
