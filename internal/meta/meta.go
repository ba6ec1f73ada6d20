// Package meta owns the library's own schema in each database (named by the
// namespace, "swo" by default): the database's random identity and its durable
// switch marks.
//
// Identity. Each database gets a random UUID the first time a switchover-mode
// connector meets it. Two URLs reach the same database exactly when they read
// the same identity; URL text is never compared. A database restored from a
// dump (or promoted from a replica) of another carries a copy of the other's
// identity; SameSession tells such twins apart with a live check and the caller
// gives the copy a new identity.
//
// Switch marks. switched_to is set in the old database by the transaction that
// commits a switch: from then on the database is obsolete. filled_from is set in
// a target while swo fills it: it is how RESET knows that rows in the target
// were put there by the library and may be cleared.
//
// Invariant: the schema is only ever created or migrated under the setup
// advisory lock (transaction-scoped), so concurrent nodes starting at once do
// not race on CREATE SCHEMA.
package meta

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Version is the version of the schema this package creates.
const Version = 1

// Info is the content of the meta row of one database.
type Info struct {
	ID         uuid.UUID
	Version    int
	CreatedAt  time.Time
	SwitchedTo uuid.UUID // zero unless this database was switched away from
	SwitchedAt time.Time
	FilledFrom uuid.UUID // zero unless swo is filling or filled this database from that one
}

// Obsolete reports whether the database was switched away from.
func (i Info) Obsolete() bool { return i.SwitchedTo != uuid.Nil }

// Store reads and writes the library's schema in a database.
type Store struct {
	schema string // validated identifier
	lock   [2]int32
}

// New returns a Store for the schema name and the setup lock key pair. The
// name must already be validated as a plain identifier.
func New(schema string, setupLock [2]int32) Store {
	return Store{schema: schema, lock: setupLock}
}

// Schema is the schema name.
func (s Store) Schema() string { return s.schema }

// Table is the qualified name of one of the library's tables.
func (s Store) Table(name string) string { return s.schema + "." + name }

// ErrNoPrivilege is wrapped when the role may not create the library's schema.
var ErrNoPrivilege = errors.New("insufficient privilege")

// ddl creates version 1 of the schema. Statements are idempotent. An
// empty schema of that name that exists already (an administrator's CREATE
// SCHEMA … AUTHORIZATION <role>, for a role without CREATE on the
// database) is used as it is: CREATE SCHEMA IF NOT EXISTS would still need
// that privilege, and COMMENT needs ownership.
func (s Store) ddl(schemaExists bool) string {
	head := fmt.Sprintf(`
CREATE SCHEMA IF NOT EXISTS %[1]s;
COMMENT ON SCHEMA %[1]s IS 'swo: live switchover state (https://github.com/pgswo/swo); managed by the library';`, s.schema)
	if schemaExists {
		head = ""
	}
	return head + fmt.Sprintf(`
CREATE TABLE IF NOT EXISTS %[1]s.meta (
	one         boolean PRIMARY KEY DEFAULT true CHECK (one),
	id          uuid NOT NULL,
	version     int NOT NULL,
	created_at  timestamptz NOT NULL DEFAULT now(),
	switched_to uuid,
	switched_at timestamptz,
	filled_from uuid
);`, s.schema)
}

// Ensure creates the schema if needed and returns the database's meta row,
// creating its identity on first use. extra are further idempotent DDL
// statements (the other packages' tables) run under the same lock.
func (s Store) Ensure(ctx context.Context, conn *pgx.Conn, extra ...string) (Info, error) {
	var info Info
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1, $2)", s.lock[0], s.lock[1]); err != nil {
			return err
		}
		exists, foreign, err := s.probe(ctx, tx)
		if err != nil {
			return err
		}
		if foreign {
			return s.foreignErr()
		}
		if !exists {
			var schemaExists bool
			if err := tx.QueryRow(ctx, "SELECT to_regnamespace($1) IS NOT NULL", s.schema).Scan(&schemaExists); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, s.ddl(schemaExists)); err != nil {
				return privilegeHint(err, s.schema, conn)
			}
		}
		for _, ddl := range extra {
			if _, err := tx.Exec(ctx, ddl); err != nil {
				return err
			}
		}
		_, err = tx.Exec(ctx, fmt.Sprintf(
			"INSERT INTO %s.meta (id, version) VALUES ($1, $2) ON CONFLICT DO NOTHING", s.schema), uuid.New(), Version)
		if err != nil {
			return err
		}
		info, err = s.read(ctx, tx)
		return err
	})
	if err != nil {
		return Info{}, fmt.Errorf("set up schema %s: %w", s.schema, err)
	}
	if info.Version > Version {
		return info, fmt.Errorf("schema %s has version %d, newer than this library's %d: upgrade the library", s.schema, info.Version, Version)
	}
	return info, nil
}

// probe reports whether the schema exists with its meta table, and whether a
// schema of that name exists that is not the library's.
func (s Store) probe(ctx context.Context, q querier) (exists, foreign bool, err error) {
	var hasSchema, hasMeta bool
	err = q.QueryRow(ctx, `SELECT
		EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1),
		to_regclass($2) IS NOT NULL`, s.schema, s.schema+".meta").Scan(&hasSchema, &hasMeta)
	if err != nil {
		return false, false, err
	}
	if hasSchema && !hasMeta {
		var n int
		err = q.QueryRow(ctx, `SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1`, s.schema).Scan(&n)
		if err != nil {
			return false, false, err
		}
		return false, n > 0, nil
	}
	return hasMeta, false, nil
}

// ErrForeignSchema is wrapped when a schema of the library's name exists and
// holds tables that are not the library's.
var ErrForeignSchema = errors.New("exists and was not created by swo")

func (s Store) foreignErr() error {
	return fmt.Errorf("schema %q %w; choose another Config.Namespace", s.schema, ErrForeignSchema)
}

// Read returns the meta row without creating anything; ok is false when the
// database has no swo schema. A schema of that name that is not the
// library's is an error wrapping ErrForeignSchema.
func (s Store) Read(ctx context.Context, conn *pgx.Conn) (info Info, ok bool, err error) {
	exists, foreign, err := s.probe(ctx, conn)
	if err == nil && foreign {
		err = s.foreignErr()
	}
	if err != nil || !exists {
		return Info{}, false, err
	}
	info, err = s.read(ctx, conn)
	if errors.Is(err, pgx.ErrNoRows) {
		return Info{}, false, nil
	}
	return info, err == nil, err
}

type querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

func (s Store) read(ctx context.Context, q querier) (Info, error) {
	var (
		i          Info
		version    int32
		to, from   *uuid.UUID
		switchedAt *time.Time
	)
	err := q.QueryRow(ctx, "SELECT id, version, created_at, switched_to, switched_at, filled_from FROM "+s.schema+".meta").
		Scan(&i.ID, &version, &i.CreatedAt, &to, &switchedAt, &from)
	if err != nil {
		return Info{}, err
	}
	i.Version = int(version)
	if to != nil {
		i.SwitchedTo = *to
	}
	if switchedAt != nil {
		i.SwitchedAt = *switchedAt
	}
	if from != nil {
		i.FilledFrom = *from
	}
	return i, nil
}

// SwitchedToQuery is the statement a connection runs, after the shared
// connection lock is granted, to learn whether the database was switched away
// from. It must run as its own statement so that, under READ COMMITTED, its
// snapshot is taken after the lock wait.
func (s Store) SwitchedToQuery() string {
	return "SELECT switched_to FROM " + s.schema + ".meta"
}

// NewIdentity gives the database a fresh identity if it still carries
// copied (the identity it carries as a copy of another database's), and
// returns its identity. Nodes starting together may all find the copy: the
// first replaces it, the others read the replacement, so they agree.
func (s Store) NewIdentity(ctx context.Context, conn *pgx.Conn, copied uuid.UUID) (uuid.UUID, error) {
	var id uuid.UUID
	err := conn.QueryRow(ctx, "UPDATE "+s.schema+".meta SET id = CASE WHEN id = $1 THEN $2 ELSE id END RETURNING id",
		copied, uuid.New()).Scan(&id)
	return id, err
}

// MarkSwitchedSQL is the statement that records, in the transaction that
// commits the switch on the old database, that it was switched away from to
// the database with identity to.
func (s Store) MarkSwitchedSQL(to uuid.UUID) string {
	return fmt.Sprintf("UPDATE %s.meta SET switched_to = '%s', switched_at = now()", s.schema, to)
}

// SetFilledFrom records that the database is being filled from the database
// with identity from (uuid.Nil clears the mark).
func (s Store) SetFilledFrom(ctx context.Context, q querier, from uuid.UUID) error {
	var v any
	if from != uuid.Nil {
		v = from
	}
	_, err := q.Exec(ctx, "UPDATE "+s.schema+".meta SET filled_from = $1", v)
	return err
}

// Session identifies one server session; see SameSession.
type Session struct {
	PID   int32
	Start time.Time
}

// CurrentSession returns the identity of conn's server session.
func CurrentSession(ctx context.Context, conn *pgx.Conn) (Session, error) {
	var s Session
	err := conn.QueryRow(ctx, `SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()`).Scan(&s.PID, &s.Start)
	return s, err
}

// SeesSession reports whether the session s runs on the same database as conn:
// the live test behind "are these two URLs the same database", independent of
// any stored identity.
func SeesSession(ctx context.Context, conn *pgx.Conn, s Session) (bool, error) {
	var same bool
	err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity
		WHERE pid = $1 AND backend_start = $2 AND datname = current_database())`, s.PID, s.Start).Scan(&same)
	return same, err
}

// privilegeHint turns a permission error into one that says what to grant.
func privilegeHint(err error, schema string, conn *pgx.Conn) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42501" {
		cfg := conn.Config()
		return fmt.Errorf("%w: role %q may not create schema %s in database %q (%s): run as an administrator "+
			"`GRANT CREATE ON DATABASE %s TO %s` or `CREATE SCHEMA %s AUTHORIZATION %s`",
			ErrNoPrivilege, cfg.User, schema, cfg.Database, pgErr.Message, cfg.Database, cfg.User, schema, cfg.User)
	}
	return err
}
