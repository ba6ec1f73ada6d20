package swo

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Advisory locks.
//
// swo coordinates the application's connections and the executing node with
// PostgreSQL advisory locks in the old database. Keys use the two-int4 form,
// whose key space PostgreSQL keeps apart from the single-bigint form most
// applications use; the first int4 is derived from Config.Namespace, so two
// deployments in one database (or an application using the two-int4 form)
// can be kept apart by choosing namespaces. The second int4 names the lock:
//
//	conn  (1)  SHARED, session-scoped: taken by every application connection
//	           the connector opens to the old database (both modes), before
//	           the connection reads the switch state, and held for the life of
//	           the connection.
//	           EXCLUSIVE, session-scoped: taken by the executing node for the
//	           stop-the-world window; held through the final sync and the
//	           commit of the switch, released (or dropped with the session)
//	           right after.
//	exec  (2)  EXCLUSIVE, session-scoped: held by the node that leads an
//	           execution, from start to end, so that two executions can never
//	           overlap even if the message log were misread.
//	setup (3)  EXCLUSIVE, transaction-scoped: serialises creation and
//	           migration of the library's schema and appends to the message
//	           log (which makes log order equal commit order).
//
// Why this is correct. An application connection to the old database exists
// only while it holds conn SHARED. The switch commits while the executor holds
// conn EXCLUSIVE, so at the commit no application connection to the old
// database exists anywhere. A connection opened after the commit gets conn
// SHARED only after the executor released it, and reads the switch state in a
// separate statement, whose READ COMMITTED snapshot is taken after the lock was
// granted: it sees the commit and goes to the new database. (Reading the state
// in the same statement that waits for the lock would use a snapshot from
// before the wait and miss the commit.) Hence no application write reaches the
// old database after the switch, and none reaches the new one before it.
//
// The library never releases a lock it did not take: it unlocks only the exact
// keys it locked on the same session, or ends the session; it never calls
// pg_advisory_unlock_all. Applications must not either (nor DISCARD ALL) on
// connections from the connector, and must reach the old database through a
// session-mode pool if any, since transaction-mode pooling loses session locks.
const (
	lockConn  int32 = 1
	lockExec  int32 = 2
	lockSetup int32 = 3
)

// lockKeys derives the advisory lock keys of one namespace.
type lockKeys struct{ space int32 }

func newLockKeys(namespace string) lockKeys {
	h := fnv.New32a()
	h.Write([]byte("swo:" + namespace))
	return lockKeys{space: int32(h.Sum32())}
}

func (k lockKeys) pair(lock int32) [2]int32 { return [2]int32{k.space, lock} }

// on is the condition, on a pg_locks row aliased l, that the row is one of
// the namespace's lock (granted or waited for). Every query that looks for
// the namespace's locks uses it.
func (k lockKeys) on(lock int32) string {
	return fmt.Sprintf("l.locktype = 'advisory' AND l.classid::int4 = %d AND l.objid::int4 = %d AND l.objsubid = 2", k.space, lock)
}

// connSharedSQL takes the connection lock in shared mode. The keys are
// literals so that it can share a simple-protocol round trip with the state
// read that must follow it as a separate statement.
func (k lockKeys) connSharedSQL() string {
	return fmt.Sprintf("SELECT pg_advisory_lock_shared(%d, %d)", k.space, lockConn)
}

// lockExclusive takes one of the namespace's locks exclusively, at session
// level, waiting at most timeout (a server-side lock_timeout, so that the
// wait ends even if the client stalls). A lock timeout returns errLockTimeout.
func (k lockKeys) lockExclusive(ctx context.Context, conn *pgx.Conn, lock int32, timeout time.Duration) error {
	_, err := conn.Exec(ctx, "SELECT set_config('lock_timeout', $1, false)", fmt.Sprintf("%dms", max(timeout.Milliseconds(), 1)))
	if err != nil {
		return err
	}
	_, err = conn.Exec(ctx, "SELECT pg_advisory_lock($1, $2)", k.space, lock)
	if _, rerr := conn.Exec(ctx, "SELECT set_config('lock_timeout', '0', false)"); err == nil {
		err = rerr
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "55P03" {
		return errLockTimeout
	}
	return err
}

var errLockTimeout = errors.New("lock timeout")

// unlock releases a session lock this session took (never anyone else's).
func (k lockKeys) unlock(ctx context.Context, conn *pgx.Conn, lock int32) error {
	_, err := conn.Exec(ctx, "SELECT pg_advisory_unlock($1, $2)", k.space, lock)
	return err
}

// holders describes the sessions (other than conn's) holding one of the
// namespace's locks, for errors that tell the operator what is in the way.
func (k lockKeys) holders(ctx context.Context, conn *pgx.Conn, lock int32) string {
	rows, err := conn.Query(ctx, `SELECT a.pid, coalesce(a.application_name, ''), coalesce(a.state, ''),
	coalesce(to_char(now() - a.xact_start, 'HH24:MI:SS'), '-'), left(coalesce(a.query, ''), 60)
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE `+k.on(lock)+` AND l.granted AND l.pid <> pg_backend_pid()
ORDER BY a.pid`)
	if err != nil {
		return "(could not list them: " + err.Error() + ")"
	}
	var out []string
	for rows.Next() {
		var pid int32
		var app, state, age, query string
		if err := rows.Scan(&pid, &app, &state, &age, &query); err != nil {
			return "(could not list them: " + err.Error() + ")"
		}
		out = append(out, fmt.Sprintf("pid %d %q (%s, transaction open %s, query %q)", pid, app, state, age, query))
	}
	if len(out) == 0 {
		return "none any more"
	}
	return strings.Join(out, "; ")
}

// terminateExclusiveHolders ends the sessions holding one of the
// namespace's locks in EXCLUSIVE mode (never the application's shared
// holders of the connection lock): the last resort against a leader that
// stopped answering but whose sessions live on. It needs the same role or
// pg_signal_backend.
func (k lockKeys) terminateExclusiveHolders(ctx context.Context, conn *pgx.Conn, lock int32) (int, error) {
	var n int
	err := conn.QueryRow(ctx, `SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l
WHERE `+k.on(lock)+` AND l.mode = 'ExclusiveLock' AND l.granted AND l.pid <> pg_backend_pid()`).Scan(&n)
	return n, err
}
