package main

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// migrationsTable records which migrations a database has. It is the
// database's own bookkeeping, not data: the switchover does not move it
// (Config.ExcludeTables), since the new database is migrated on its own
// with --migrate-next before the switch.
const migrationsTable = "public.schema_migrations"

// migrations are the service's schema, in order; never edit one that was
// released, add a new one.
var migrations = []string{
	1: `CREATE TABLE todos (
	id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	title      text NOT NULL CHECK (title <> ''),
	done       boolean NOT NULL DEFAULT false,
	created_at timestamptz NOT NULL DEFAULT now(),
	updated_at timestamptz NOT NULL DEFAULT now()
)`,
	2: `CREATE INDEX todos_open ON todos (created_at) WHERE NOT done`,
}

// beginner is what migrate needs: a *pgx.Conn or a *pgxpool.Pool.
type beginner interface {
	Begin(ctx context.Context) (pgx.Tx, error)
}

// migrate applies the migrations db lacks, in one transaction, and returns
// how many it applied. It is idempotent, and safe when several instances
// start at once: they serialise on a transaction-level advisory lock. With
// nothing to apply it changes nothing (no DDL at all), so an instance that
// starts during a switchover does not disturb it.
func migrate(ctx context.Context, db beginner) (int, error) {
	tx, err := db.Begin(ctx)
	if err != nil {
		return 0, fmt.Errorf("migrate: %w", err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // after Commit it does nothing
	// The single-key form of the advisory lock: swo's own locks use the
	// two-key form, so the two never collide.
	if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtext('todo-service migrations')::bigint)"); err != nil {
		return 0, fmt.Errorf("migrate: lock: %w", err)
	}
	var exists bool
	if err := tx.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", migrationsTable).Scan(&exists); err != nil {
		return 0, fmt.Errorf("migrate: %w", err)
	}
	current := 0
	if exists {
		if err := tx.QueryRow(ctx, "SELECT coalesce(max(version), 0) FROM "+migrationsTable).Scan(&current); err != nil {
			return 0, fmt.Errorf("migrate: read the version: %w", err)
		}
	} else if _, err := tx.Exec(ctx, "CREATE TABLE "+migrationsTable+" (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"); err != nil {
		return 0, fmt.Errorf("migrate: %w", err)
	}
	last := len(migrations) - 1
	if current > last {
		return 0, fmt.Errorf("migrate: the database is at version %d, newer than this build (%d): run a newer build", current, last)
	}
	for v := current + 1; v <= last; v++ {
		if _, err := tx.Exec(ctx, migrations[v]); err != nil {
			return 0, fmt.Errorf("migrate: version %d: %w", v, err)
		}
		if _, err := tx.Exec(ctx, "INSERT INTO "+migrationsTable+" (version) VALUES ($1)", v); err != nil {
			return 0, fmt.Errorf("migrate: version %d: %w", v, err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return 0, fmt.Errorf("migrate: %w", err)
	}
	return last - current, nil
}

// migrateURL applies the migrations to the database at url over a plain
// connection of its own. It is for the next database before a switchover
// (--migrate-next): the service's connector routes to the current one.
func migrateURL(ctx context.Context, url string) (int, error) {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return 0, fmt.Errorf("connect to the next database: %w", err)
	}
	defer conn.Close(context.Background())
	return migrate(ctx, conn)
}
