-- billing-service: the tables it writes in the shared `account` database.
--
-- Idempotent (IF NOT EXISTS everywhere): safe to apply on every deploy, to a
-- database that accounts.svc.plus already created. The shared tables keep the
-- column names, types and keys of the shared account schema; billing-service
-- never creates or alters public.users, which belongs to accounts (local runs
-- and tests create a minimal stub of it before applying this file).

-- Stop at once, with a clear message, where accounts' users table is missing
-- (every table below references it). Apply with psql -v ON_ERROR_STOP=1.
DO $$
BEGIN
  IF to_regclass('public.users') IS NULL THEN
    RAISE EXCEPTION 'public.users does not exist: apply schema.sql to the shared account database, where accounts.svc.plus owns users (local runs and tests create deploy/users_stub.sql first)';
  END IF;
END
$$;

-- Shared tables (written by billing-service, read by accounts) --------------

CREATE TABLE IF NOT EXISTS public.traffic_stat_checkpoints (
  node_id TEXT NOT NULL,
  account_uuid UUID NOT NULL REFERENCES public.users(uuid) ON DELETE CASCADE,
  last_uplink_total BIGINT NOT NULL DEFAULT 0,
  last_downlink_total BIGINT NOT NULL DEFAULT 0,
  last_seen_at TIMESTAMPTZ NOT NULL,
  xray_revision TEXT NOT NULL DEFAULT '',
  reset_epoch BIGINT NOT NULL DEFAULT 0,
  created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (node_id, account_uuid)
);

CREATE TABLE IF NOT EXISTS public.traffic_minute_buckets (
  bucket_start TIMESTAMPTZ NOT NULL,
  node_id TEXT NOT NULL,
  account_uuid UUID NOT NULL REFERENCES public.users(uuid) ON DELETE CASCADE,
  region TEXT NOT NULL DEFAULT '',
  line_code TEXT NOT NULL DEFAULT '',
  uplink_bytes BIGINT NOT NULL DEFAULT 0,
  downlink_bytes BIGINT NOT NULL DEFAULT 0,
  total_bytes BIGINT NOT NULL DEFAULT 0,
  multiplier DOUBLE PRECISION NOT NULL DEFAULT 1.0,
  rating_status TEXT NOT NULL DEFAULT 'pending',
  source_revision TEXT NOT NULL DEFAULT '',
  created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (bucket_start, node_id, account_uuid, region, line_code)
);

CREATE TABLE IF NOT EXISTS public.billing_ledger (
  id UUID PRIMARY KEY,
  account_uuid UUID NOT NULL REFERENCES public.users(uuid) ON DELETE CASCADE,
  bucket_start TIMESTAMPTZ NOT NULL,
  bucket_end TIMESTAMPTZ NOT NULL,
  entry_type TEXT NOT NULL,
  rated_bytes BIGINT NOT NULL DEFAULT 0,
  amount_delta DOUBLE PRECISION NOT NULL DEFAULT 0,
  balance_after DOUBLE PRECISION NOT NULL DEFAULT 0,
  pricing_rule_version TEXT NOT NULL DEFAULT '',
  created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.account_quota_states (
  account_uuid UUID PRIMARY KEY REFERENCES public.users(uuid) ON DELETE CASCADE,
  remaining_included_quota BIGINT NOT NULL DEFAULT 0,
  current_balance DOUBLE PRECISION NOT NULL DEFAULT 0,
  arrears BOOLEAN NOT NULL DEFAULT false,
  throttle_state TEXT NOT NULL DEFAULT 'normal',
  suspend_state TEXT NOT NULL DEFAULT 'active',
  last_rated_bucket_at TIMESTAMPTZ NULL,
  effective_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- When the balance went below zero (the bucket of the charge that crossed
-- zero, or when the arrears sweep first saw a debt that rating did not make);
-- NULL when not in arrears.
ALTER TABLE public.account_quota_states ADD COLUMN IF NOT EXISTS arrears_since TIMESTAMPTZ NULL;

-- true while a suspension is billing-service's (arrears): the sweep lifts only
-- those. A suspension made by anyone else (every one older than this column
-- included) is never touched.
ALTER TABLE public.account_quota_states
  ADD COLUMN IF NOT EXISTS suspended_by_billing BOOLEAN NOT NULL DEFAULT false;

-- Read only for billing-service: accounts owns the pricing of each account.
CREATE TABLE IF NOT EXISTS public.account_billing_profiles (
  account_uuid UUID PRIMARY KEY REFERENCES public.users(uuid) ON DELETE CASCADE,
  package_name TEXT NOT NULL DEFAULT 'default',
  included_quota_bytes BIGINT NOT NULL DEFAULT 0,
  base_price_per_byte DOUBLE PRECISION NOT NULL DEFAULT 0,
  region_multiplier DOUBLE PRECISION NOT NULL DEFAULT 1.0,
  line_multiplier DOUBLE PRECISION NOT NULL DEFAULT 1.0,
  peak_multiplier DOUBLE PRECISION NOT NULL DEFAULT 1.0,
  offpeak_multiplier DOUBLE PRECISION NOT NULL DEFAULT 1.0,
  pricing_rule_version TEXT NOT NULL DEFAULT 'pricing-default-v1',
  created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.billing_source_sync_state (
  source_id TEXT PRIMARY KEY,
  last_completed_until TIMESTAMPTZ NULL,
  last_attempted_at TIMESTAMPTZ NULL,
  last_succeeded_at TIMESTAMPTZ NULL,
  last_error TEXT NOT NULL DEFAULT '',
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The watermark a source's current (or last) run started from: /v1/status
-- shows a catch-up's progress and when it should be done.
ALTER TABLE public.billing_source_sync_state ADD COLUMN IF NOT EXISTS run_from TIMESTAMPTZ NULL;

-- Every active account adds a row a minute at the head of its own range in
-- these two indexes. Built at fillfactor 80 (PostgreSQL's default is 90), a
-- new or rebuilt index leaves each account about 45 rows of room before its
-- leaf splits; at 90 every active account's leaf splits within about 20
-- minutes of a build, and each split writes a neighbouring leaf to the WAL
-- in full. It applies to builds only (an existing index: ALTER INDEX ... SET
-- (fillfactor = 80), then REINDEX INDEX CONCURRENTLY; see the README).
CREATE INDEX IF NOT EXISTS idx_traffic_minute_buckets_account_bucket
  ON public.traffic_minute_buckets (account_uuid, bucket_start DESC) WITH (fillfactor = 80);

CREATE INDEX IF NOT EXISTS idx_billing_ledger_account_created
  ON public.billing_ledger (account_uuid, created_at DESC) WITH (fillfactor = 80);

-- Tables billing-service alone owns ------------------------------------------

-- The original (Go) service's checkpoints this service has not taken over yet:
-- one per (storage node, account), under the plain key env:node, whatever the
-- inbound. Recorded once, when this table is created on a database no release
-- of this service has run on (billing_job_runs, created below, does not exist
-- yet), from every plain-key checkpoint then present: stop the original first.
-- Over an earlier release's database the plain rows are that release's own
-- (its untagged series) and nothing is recorded. The first snapshot of each
-- (node, account) after the original's last sample decides, and removes the
-- row (README: Taking over from the original service).
DO $$
BEGIN
  IF to_regclass('public.billing_inherited_checkpoints') IS NULL THEN
    CREATE TABLE public.billing_inherited_checkpoints (
      node_id TEXT NOT NULL,
      account_uuid UUID NOT NULL,
      PRIMARY KEY (node_id, account_uuid)
    );
    IF to_regclass('public.billing_job_runs') IS NULL THEN
      INSERT INTO public.billing_inherited_checkpoints (node_id, account_uuid)
      SELECT node_id, account_uuid FROM public.traffic_stat_checkpoints WHERE strpos(node_id, '#') = 0;
    END IF;
  END IF;
END
$$;

-- The newest snapshot applied of each storage node (env:node), whoever
-- delivered it: an older snapshot only replays, it never starts a series, so
-- the same snapshots bill the same however they are split into pages and
-- pushes (an account whose users row appeared meanwhile starts at the next
-- new snapshot, not at a re-read one).
CREATE TABLE IF NOT EXISTS public.billing_node_marks (
  node_id TEXT PRIMARY KEY,
  last_snapshot_at TIMESTAMPTZ NOT NULL
);

-- One row per finished job run (by any worker, thread or host), so /v1/status
-- and /healthz answer the same whichever worker is asked. Retention is
-- bounded by the service (it deletes the oldest rows past a fixed count).
CREATE TABLE IF NOT EXISTS public.billing_job_runs (
  id BIGSERIAL PRIMARY KEY,
  job TEXT NOT NULL,
  status TEXT NOT NULL,
  started_at TIMESTAMPTZ NOT NULL,
  finished_at TIMESTAMPTZ NOT NULL,
  result JSONB NOT NULL
);

CREATE INDEX IF NOT EXISTS idx_billing_job_runs_finished
  ON public.billing_job_runs (finished_at DESC);

-- Monotonic counters behind /metrics: runs are pruned, totals never shrink.
CREATE TABLE IF NOT EXISTS public.billing_job_totals (
  job TEXT NOT NULL,
  status TEXT NOT NULL,
  runs BIGINT NOT NULL DEFAULT 0,
  processed_samples BIGINT NOT NULL DEFAULT 0,
  written_minutes BIGINT NOT NULL DEFAULT 0,
  replayed_minutes BIGINT NOT NULL DEFAULT 0,
  invalid_samples BIGINT NOT NULL DEFAULT 0,
  unknown_account_samples BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (job, status)
);

ALTER TABLE public.billing_job_totals
  ADD COLUMN IF NOT EXISTS counter_resets BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS already_billed BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS suspended BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS lifted BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS baselined BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS invalid_not_an_object BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS invalid_bad_counter BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS invalid_bad_uuid BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS invalid_bad_label BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS invalid_duplicate BIGINT NOT NULL DEFAULT 0;

-- Pushed bodies by push source and outcome (applied, failed, rejected), for
-- /metrics; source_id '' counts bodies whose token matched no push source.
CREATE TABLE IF NOT EXISTS public.billing_push_totals (
  source_id TEXT NOT NULL,
  outcome TEXT NOT NULL,
  pushes BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (source_id, outcome)
);
