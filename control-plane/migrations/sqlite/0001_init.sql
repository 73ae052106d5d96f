-- n-kudo control plane schema, version 1 (SQLite). Ids are UUID strings, times are Unix milliseconds,
-- flags are 0/1. Kept column-for-column equal to migrations/postgres/0001_init.sql.

CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    slug TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    primary_region TEXT NOT NULL,
    data_retention_days BIGINT NOT NULL CHECK (data_retention_days >= 7),
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    last_used_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX idx_api_keys_tenant ON api_keys (tenant_id);

CREATE TABLE sites (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    external_key TEXT,
    location_country_code TEXT,
    connectivity_state TEXT NOT NULL DEFAULT 'OFFLINE' CHECK (connectivity_state IN ('ONLINE', 'PARTIAL', 'OFFLINE')),
    last_heartbeat_at BIGINT,
    labels_json TEXT NOT NULL DEFAULT '{}',
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (tenant_id, name),
    UNIQUE (tenant_id, external_key)
);

CREATE TABLE enrollment_tokens (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    site_id TEXT NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    used_by_agent_id TEXT
);
CREATE INDEX idx_enrollment_tokens_site ON enrollment_tokens (tenant_id, site_id);

CREATE TABLE hosts (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    site_id TEXT NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    hostname TEXT NOT NULL,
    cpu_cores_total BIGINT NOT NULL DEFAULT 0,
    memory_bytes_total BIGINT NOT NULL DEFAULT 0,
    storage_bytes_total BIGINT NOT NULL DEFAULT 0,
    kvm_available BIGINT NOT NULL DEFAULT 0,
    cloud_hypervisor_available BIGINT NOT NULL DEFAULT 0,
    machine_id_sha256 TEXT,
    primary_mac_sha256 TEXT,
    facts_json TEXT,
    last_facts_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (tenant_id, site_id, hostname)
);

CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    site_id TEXT NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    host_id TEXT NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
    agent_version TEXT NOT NULL,
    os TEXT NOT NULL,
    arch TEXT NOT NULL,
    kernel_version TEXT,
    state TEXT NOT NULL DEFAULT 'OFFLINE' CHECK (state IN ('ONLINE', 'DEGRADED', 'OFFLINE')),
    heartbeat_seq BIGINT NOT NULL DEFAULT 0,
    cert_serial TEXT NOT NULL,
    cert_expires_at BIGINT NOT NULL,
    refresh_token_hash TEXT NOT NULL,
    enrollment_token_id TEXT,
    labels_json TEXT NOT NULL DEFAULT '{}',
    netbird_json TEXT,
    enrolled_at BIGINT NOT NULL,
    last_heartbeat_at BIGINT,
    revoked_at BIGINT,
    revoke_reason TEXT,
    auth_changed_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX idx_agents_site ON agents (tenant_id, site_id, state);
CREATE INDEX idx_agents_host ON agents (host_id);
CREATE INDEX idx_agents_auth_changed ON agents (auth_changed_at);
CREATE INDEX idx_agents_last_heartbeat ON agents (state, last_heartbeat_at);

-- VMs as the control plane plans them and as agents report them; the id is the agent's VM id, unique per tenant.
CREATE TABLE microvms (
    tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    id TEXT NOT NULL,
    site_id TEXT NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    host_id TEXT,
    name TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('CREATING', 'STOPPED', 'RUNNING', 'PAUSED', 'DELETING', 'DELETED', 'ERROR')),
    vcpu_count BIGINT NOT NULL DEFAULT 1,
    memory_mib BIGINT NOT NULL DEFAULT 256,
    spec_json TEXT,
    last_reported_at BIGINT,
    last_transition_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX idx_microvms_site ON microvms (tenant_id, site_id, state);

-- Plans and their executions (one execution per action); leased to one agent at a time.
CREATE TABLE plans (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    site_id TEXT NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    idempotency_key TEXT NOT NULL,
    request_sha256 TEXT NOT NULL,
    client_request_id TEXT,
    plan_version BIGINT NOT NULL,
    status TEXT NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'IN_PROGRESS', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
    leased_by_agent_id TEXT,
    lease_expires_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    started_at BIGINT,
    completed_at BIGINT,
    UNIQUE (tenant_id, site_id, idempotency_key),
    UNIQUE (site_id, plan_version)
);
CREATE INDEX idx_plans_lease ON plans (tenant_id, site_id, status, lease_expires_at, created_at);

CREATE TABLE executions (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    site_id TEXT NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    plan_id TEXT NOT NULL REFERENCES plans(id) ON DELETE CASCADE,
    ordinal BIGINT NOT NULL,
    operation_id TEXT NOT NULL,
    operation_type TEXT NOT NULL,
    vm_id TEXT,
    payload_json TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'PENDING' CHECK (state IN ('PENDING', 'IN_PROGRESS', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
    error_code TEXT,
    error_message TEXT,
    host_id TEXT,
    agent_id TEXT,
    started_at BIGINT,
    completed_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (plan_id, operation_id),
    UNIQUE (plan_id, ordinal)
);
CREATE INDEX idx_executions_site ON executions (tenant_id, site_id, state);

CREATE TABLE execution_logs (
    tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    execution_id TEXT NOT NULL REFERENCES executions(id) ON DELETE CASCADE,
    sequence BIGINT NOT NULL,
    severity TEXT NOT NULL CHECK (severity IN ('DEBUG', 'INFO', 'WARN', 'ERROR')),
    message TEXT NOT NULL,
    emitted_at BIGINT NOT NULL,
    ingested_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, execution_id, sequence)
);

-- Audit: one hash chain per tenant ('' is the system chain, for events with no tenant).
CREATE TABLE audit_chain_heads (
    tenant_id TEXT PRIMARY KEY,
    last_seq BIGINT NOT NULL,
    last_hash TEXT NOT NULL
);

CREATE TABLE audit_events (
    tenant_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    prev_hash TEXT NOT NULL,
    entry_hash TEXT NOT NULL,
    occurred_at BIGINT NOT NULL,
    actor_type TEXT NOT NULL CHECK (actor_type IN ('ADMIN', 'USER', 'AGENT', 'SYSTEM', 'ANONYMOUS')),
    actor_id TEXT,
    site_id TEXT,
    action TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    request_id TEXT,
    source_ip TEXT,
    metadata_json TEXT NOT NULL,
    PRIMARY KEY (tenant_id, seq)
);
CREATE INDEX idx_audit_events_time ON audit_events (tenant_id, occurred_at);
