-- A minimal stand-in for accounts' public.users, for local runs and tests
-- only. In production the table belongs to accounts.svc.plus; schema.sql
-- references it and never creates it.
CREATE TABLE IF NOT EXISTS public.users (
  uuid UUID PRIMARY KEY,
  username TEXT NOT NULL DEFAULT '',
  email TEXT NOT NULL DEFAULT '',
  created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
