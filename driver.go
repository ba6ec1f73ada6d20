package swo

import (
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"weak"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/pgswo/swo/internal/dsn"
	"github.com/pgswo/swo/internal/meta"
)

// The router: where new application connections go.
//
// A connector has one router, which both front ends (database/sql through
// Connect, pgx through OpenPool) share. The router holds the route (old
// database, new database, or refused), pauses new connections during the
// stop-the-world window, drains the old database's connections, and keeps
// the connections to the new database opened ahead of the switch. It knows
// nothing of the cluster: the node tells it to pause, resume and switch.
//
// Goroutines: none of its own, but the callers of Connect and of the pools'
// hooks, the node's reactions, and timers (a pause's deadline, the warm
// connections' expiry) all call into it.
//
// Lock order: router.mu is a leaf. It guards the set of connections and
// pools to drain and serialises route changes with the drain, so that a
// connection registered after a route change sees the new route. The route
// itself is an atomic pointer, read without locking on every connection.

// common is what every part of a connector shares: the configuration and
// the handles derived from it. It does not change after NewConnector.
type common struct {
	cfg  Config
	log  *slog.Logger
	keys lockKeys
	meta meta.Store
	old  *endpoint
	next *endpoint // nil in normal mode
	redactor
}

// newCommon validates cfg (with its defaults) and derives the shared part
// of a connector from it: NewConnector's, and Check's and Verify's.
func newCommon(cfg Config) (*common, error) {
	cfg = cfg.withDefaults()
	p, err := cfg.parse()
	if err != nil {
		return nil, err
	}
	keys := newLockKeys(cfg.Namespace)
	return &common{
		cfg: cfg, log: cfg.Logger.With("swo.node", cfg.NodeName), keys: keys,
		meta: meta.New(cfg.Namespace, keys.pair(lockSetup)), old: p.old, next: p.next,
		redactor: p.redactor,
	}, nil
}

// endpoint is one configured database.
type endpoint struct {
	label string          // "old" or "next"
	url   *pgx.ConnConfig // as parsed from the URL; never modified

	mu   sync.RWMutex
	info meta.Info // as read when the connector started (the next database's may be read again)
}

// Info returns what the connector knows of the database.
func (e *endpoint) Info() meta.Info {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.info
}

func (e *endpoint) setInfo(info meta.Info) {
	e.mu.Lock()
	e.info = info
	e.mu.Unlock()
}

// describe names the database for messages (never with its password).
func (e *endpoint) describe() string { return dsn.Describe(e.url) }

// Connection roles, shown in application_name.
const (
	roleApp       = "app"        // application connection, switchover mode
	roleAppNormal = "app-normal" // application connection, normal mode (no NextURL)
	roleCtl       = "ctl"        // the node's own control connection (never holds the connection lock)
	roleSync      = "sync"       // data sync worker
	roleLock      = "lock"       // the leader's session: the exec lock, and the connection lock in the window
	roleVerify    = "verify"     // Verify's sessions
)

// adjust makes cc the settings of a connection to e in role. It is the one
// place where connection settings are built: the URL's, then the host's
// Config.BeforeConnect, then the application_name that marks the role. The
// library's own sessions keep the URL's runtime parameters whatever the
// host sets (a statement_timeout meant for the application must not end a
// copy).
func (s *common) adjust(ctx context.Context, e *endpoint, role string, cc *pgx.ConnConfig, base func(*pgx.ConnConfig)) error {
	*cc = *e.url.Copy()
	if base != nil {
		base(cc) // a front end's own settings (a pool configuration's), before the host's hook
	}
	if hook := s.cfg.BeforeConnect; hook != nil {
		if err := hook(ctx, cc); err != nil {
			return fmt.Errorf("Config.BeforeConnect: %w", err)
		}
		if cc.Host != e.url.Host || cc.Port != e.url.Port || cc.Database != e.url.Database || cc.User != e.url.User {
			return fmt.Errorf("%w: Config.BeforeConnect changed where a connection to the %s database goes (host, port, database or user): "+
				"it may adjust connections (tracer, TLS, parameters, password), not redirect them", ErrConfig, e.label)
		}
		if role != roleApp && role != roleAppNormal {
			// The library's own sessions keep the URL's runtime parameters
			// and query settings: their statements rely on pgx's default
			// (extended protocol) encoding of their parameters.
			url := e.url.Copy()
			cc.RuntimeParams = url.RuntimeParams
			cc.DefaultQueryExecMode = url.DefaultQueryExecMode
			cc.StatementCacheCapacity = url.StatementCacheCapacity
			cc.DescriptionCacheCapacity = url.DescriptionCacheCapacity
		}
		if cc.RuntimeParams == nil {
			cc.RuntimeParams = map[string]string{}
		}
	}
	cc.RuntimeParams["application_name"] = s.appName(e, role)
	return nil
}

// config returns the settings of a connection to e in role (see adjust).
func (s *common) config(ctx context.Context, e *endpoint, role string) (*pgx.ConnConfig, error) {
	cc := new(pgx.ConnConfig)
	if err := s.adjust(ctx, e, role, cc, nil); err != nil {
		return nil, err
	}
	return cc, nil
}

// appName is the application_name of a connection: the one configured in the
// URL if any, then the marker "<namespace>:<role>:" and the node's name
// ("swo:app:web-1" by default). It fits PostgreSQL's 63 bytes by cutting the
// URL's name first, then the node's, never the marker: the library finds its
// sessions by it (sessionsOf), and two namespaces' sessions stay apart.
func (s *common) appName(e *endpoint, role string) string {
	const limit = 63 // NAMEDATALEN - 1
	name := s.cfg.Namespace + ":" + role + ":" + s.cfg.NodeName
	if len(name) > limit {
		name = name[:limit]
	}
	if base := e.url.RuntimeParams["application_name"]; base != "" {
		if room := limit - len(name) - 1; room > 0 {
			name = base[:min(len(base), room)] + " " + name
		}
	}
	return name
}

// sessionsOf is a regular expression (for PostgreSQL's ~) matching the
// application_name of this namespace's sessions in the given roles: the
// marker, at the start or after the URL's own name, exactly.
func (s *common) sessionsOf(roles ...string) string {
	return "(^| )" + s.cfg.Namespace + ":(" + strings.Join(roles, "|") + "):"
}

// connect opens a pgx connection to e for the library's own use. Its
// transactions are READ COMMITTED whatever the role's or the database's
// default: the library's statements that wait for a lock (the message log's
// append, the switch state's read) must read what committed during the wait.
func (s *common) connect(ctx context.Context, e *endpoint, role string) (*pgx.Conn, error) {
	cfg, err := s.config(ctx, e, role)
	if err != nil {
		return nil, err
	}
	cfg.RuntimeParams["default_transaction_isolation"] = "read committed"
	cfg.RuntimeParams["jit"] = "off" // the library's queries are short: compiling them would cost more than running them
	// The library bounds its own waits (lock_timeout where it waits for a
	// lock, contexts elsewhere): a timeout in the URL meant for the
	// application must not cut the leader's wait for the connection lock.
	cfg.RuntimeParams["statement_timeout"] = "0"
	cfg.RuntimeParams["lock_timeout"] = "0"
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, s.scrub(fmt.Errorf("connect to %s database %s: %w", e.label, e.describe(), err))
	}
	return conn, nil
}

// obsolete is the error for a database that was switched away from.
func (s *common) obsolete(e *endpoint, info meta.Info) error {
	what := e.describe()
	if info.ID != uuid.Nil {
		what += fmt.Sprintf(" (database %s)", info.ID)
	}
	return fmt.Errorf("%w: %s was switched over to database %s at %s; "+
		"restart with --db-url (Config.OldURL) pointing at the new database", ErrObsolete, what,
		info.SwitchedTo, info.SwitchedAt.UTC().Format(time.RFC3339))
}

// target of new connections.
const (
	toOld = iota
	toNext
	refused
)

// route says where new connections go, and whether they wait.
type route struct {
	target int
	err    error         // when refused
	to     uuid.UUID     // when refused: the identity of the database the old one was switched to
	at     time.Time     // when refused: when the next database's identity was last read
	paused chan struct{} // non-nil while paused; closed when the pause ends
}

func (r *route) String() string {
	return [...]string{"old", "next", "refused"}[r.target]
}

// router decides where the application's new connections go (see above).
type router struct {
	*common

	route atomic.Pointer[route]
	mu    sync.Mutex
	conns map[*conn]struct{}                      // database/sql connections to the old database (switchover mode)
	pools map[weak.Pointer[pgxpool.Pool]]struct{} // pools from OpenPool; a pool the host dropped is forgotten

	sqlOld, sqlNext driver.Connector // pgx stdlib connectors of the database/sql front end
	warm            chan driver.Conn // connections to the next database opened before the pause
	warmGen         int64            // under mu: bumped when warm connections are dropped, which stops a prewarm in progress
	closed          atomic.Bool
}

func newRouter(s *common) *router {
	r := &router{common: s, conns: map[*conn]struct{}{}, pools: map[weak.Pointer[pgxpool.Pool]]struct{}{}, warm: make(chan driver.Conn, 32)}
	r.route.Store(&route{target: toOld})
	if s.next == nil {
		r.sqlOld = r.stdlibConnector(s.old, roleAppNormal)
	} else {
		r.sqlOld = r.stdlibConnector(s.old, roleApp)
		r.sqlNext = r.stdlibConnector(s.next, roleApp)
	}
	return r
}

// stdlibConnector builds the pgx stdlib connector of database/sql
// connections to e. The host's AfterConnect is not given to it: it runs
// after the lock and the state read (connectOld), never before them.
func (r *router) stdlibConnector(e *endpoint, role string) driver.Connector {
	return stdlib.GetConnector(*e.url.Copy(), stdlib.OptionBeforeConnect(func(ctx context.Context, cc *pgx.ConnConfig) error {
		return r.adjust(ctx, e, role, cc, nil)
	}))
}

// wait returns the route a new connection takes, waiting (honouring ctx)
// while new connections are paused.
func (r *router) wait(ctx context.Context) (*route, error) {
	for {
		if r.closed.Load() {
			return nil, ErrClosed
		}
		rt := r.route.Load()
		if rt.paused == nil {
			return rt, nil
		}
		select {
		case <-rt.paused:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// admit runs on every new application connection, of either front end,
// before anything else is sent on it: it takes the shared connection lock
// and then, in a separate statement, reads the switch state (see lock.go for
// why the order and the separation matter). On the old database it returns
// the identity of the database the old one was switched to, or uuid.Nil.
//
// Connections to the next database, after the switch, are admitted the same
// way on that database: a node still started with both URLs after a switch
// must not reach a database that was switched away from in turn (a chained
// switchover, B to C after A to B), and its connections to it hold that
// database's lock, so such a switch cannot commit while they exist. The
// node cannot follow a switch it is not part of: those connections are
// refused with ErrObsolete.
func (r *router) admit(ctx context.Context, e *endpoint, pc *pgconn.PgConn) (uuid.UUID, error) {
	to, err := r.readSwitchedTo(ctx, e, pc)
	if err != nil {
		return uuid.Nil, fmt.Errorf("check the state of %s: %w", e.describe(), err)
	}
	if to != uuid.Nil && (r.next == nil || e == r.next) {
		info := e.Info()
		info.SwitchedTo, info.SwitchedAt = to, time.Now()
		return uuid.Nil, r.obsolete(e, info)
	}
	return to, nil
}

// unsafeSingleStatementRead makes admit read the switch state in the
// statement that waits for the lock: the mistake lock.go warns about. Only
// the negative-control test sets it, to show that the test catches it.
var unsafeSingleStatementRead bool

// readSwitchedTo takes the shared connection lock, then reads switched_to, in
// one round trip of two statements.
func (r *router) readSwitchedTo(ctx context.Context, e *endpoint, pc *pgconn.PgConn) (uuid.UUID, error) {
	if unsafeSingleStatementRead && r.next != nil && e == r.old {
		res, err := pc.Exec(ctx, fmt.Sprintf("SELECT (%s) FROM (%s) l", r.meta.SwitchedToQuery(), r.keys.connSharedSQL())).ReadAll()
		if err != nil || len(res) != 1 || len(res[0].Rows) != 1 || res[0].Rows[0][0] == nil {
			return uuid.Nil, err
		}
		return uuid.ParseBytes(res[0].Rows[0][0])
	}
	// An explicit READ COMMITTED transaction: under a default isolation level
	// of REPEATABLE READ or SERIALIZABLE (set for the role or the database),
	// the implicit transaction of a multi-statement query would take its
	// snapshot before the lock wait and miss a switch committed meanwhile.
	// The application's own statement_timeout and lock_timeout must not fail
	// the wait for the lock during the window: the connection waits.
	q := "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0; " + r.keys.connSharedSQL() + "; "
	if r.next != nil {
		q += r.meta.SwitchedToQuery()
	} else {
		// Normal mode: the schema may not exist, and nothing may be created.
		q += fmt.Sprintf("SELECT to_regclass('%s.meta') IS NOT NULL", r.meta.Schema())
	}
	res, err := pc.Exec(ctx, q+"; COMMIT").ReadAll()
	if err != nil {
		return uuid.Nil, err
	}
	if len(res) != 6 || len(res[4].Rows) != 1 {
		return uuid.Nil, fmt.Errorf("unexpected reply to the state check (%d results)", len(res))
	}
	v := res[4].Rows[0][0]
	if r.next == nil {
		if string(v) != "t" {
			return uuid.Nil, nil
		}
		res, err := pc.Exec(ctx, r.meta.SwitchedToQuery()).ReadAll()
		if err != nil {
			return uuid.Nil, err
		}
		if len(res) != 1 || len(res[0].Rows) != 1 {
			return uuid.Nil, nil
		}
		v = res[0].Rows[0][0]
	}
	if v == nil {
		return uuid.Nil, nil
	}
	return uuid.ParseBytes(v)
}

// afterConnect runs the host's Config.AfterConnect on a new application
// connection (after admit, for the old database).
func (r *router) afterConnect(ctx context.Context, conn *pgx.Conn) error {
	if hook := r.cfg.AfterConnect; hook != nil {
		if err := hook(ctx, conn); err != nil {
			return fmt.Errorf("Config.AfterConnect: %w", err)
		}
	}
	return nil
}

// switched moves the node to the new database: new connections go there,
// every application connection to the old database is drained. If the old
// database was switched to another database than NextURL's, new connections
// are refused.
func (r *router) switched(to uuid.UUID) {
	rt := &route{target: toNext}
	next := r.next.Info().ID
	if to != next {
		// The identity this node knows may be stale: the next database was
		// unreachable when the node last read it, or another node gave it a
		// new one since. Read it again before refusing.
		next = r.refreshNext()
	}
	if to != next {
		info := r.old.Info()
		info.SwitchedTo = to
		rt = &route{target: refused, to: to, at: time.Now(),
			err: fmt.Errorf("%w (and not to the database of --db-url-next, Config.NextURL: %s)", r.obsolete(r.old, info), next)}
	}
	if r.setRoute(rt) {
		r.log.Info("switched: new connections go to the next database", "routing", rt.String())
		time.AfterFunc(time.Minute, r.drainWarm) // what the pool did not need by then
	}
}

// refreshNext reads the next database's identity again and returns it (the
// known one if the database cannot be read).
func (r *router) refreshNext() uuid.UUID {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := r.connect(ctx, r.next, roleCtl)
	if err != nil {
		return r.next.Info().ID
	}
	defer closeBounded(conn)
	info, ok, err := r.meta.Read(ctx, conn)
	if err != nil || !ok || info.ID == uuid.Nil {
		return r.next.Info().ID
	}
	r.next.setInfo(info)
	return info.ID
}

// refreshEvery is how often a refused route reads the next database's
// identity again.
const refreshEvery = 5 * time.Second

// setRoute replaces the route, ends a pause, and drains the old database's
// connections unless the new route still goes to it unpaused. It reports
// whether the route changed.
func (r *router) setRoute(rt *route) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	prev := r.route.Load()
	if prev.target == rt.target && prev.paused == rt.paused {
		return false
	}
	if prev.target != toOld && rt.target == toOld {
		return false // a switch is never undone
	}
	r.route.Store(rt)
	if prev.paused != nil && prev.paused != rt.paused {
		close(prev.paused)
	}
	if rt.target != toOld || rt.paused != nil {
		for cn := range r.conns {
			cn.retire()
		}
		for wp := range r.pools {
			// Idle connections close now; those in use close when released.
			// After a switch the pool holds only connections to the old
			// database, so it is emptied whole. (Resetting a pool the host
			// closed is harmless.)
			if p := wp.Value(); p != nil {
				p.Reset()
			} else {
				delete(r.pools, wp)
			}
		}
	}
	return true
}

// pause makes new connections wait and drains the old database's connections:
// idle ones are closed now, busy ones when they are returned. The pause ends
// with resume, with the switch, or by itself at until, whichever comes first;
// ending by itself is safe because a connection to the old database still
// waits for the connection lock and then reads the switch state.
func (r *router) pause(until time.Time) {
	rt := &route{target: toOld, paused: make(chan struct{})}
	if !r.setRoute(rt) {
		return
	}
	time.AfterFunc(time.Until(until), func() {
		if r.route.Load() == rt {
			r.resume()
		}
	})
	go r.sweepPools(rt)
}

// sweepPools empties the pools again and again while the pause rt lasts.
// No pool opens a connection to the old database while paused, so an idle
// one found then straddled the drain's Reset: pgxpool adds the connections
// it opens in the background (MinConns) to its idle list without looking
// at resets, and one that took the lock before the pause would hold it.
func (r *router) sweepPools(rt *route) {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-rt.paused:
			return
		case <-t.C:
		}
		r.mu.Lock()
		for wp := range r.pools {
			if p := wp.Value(); p != nil {
				p.Reset()
			}
		}
		r.mu.Unlock()
	}
}

// resume ends a pause, or a run, without a switch.
func (r *router) resume() {
	rt := r.route.Load()
	if rt.paused != nil {
		r.setRoute(&route{target: rt.target})
	}
	if rt.target == toOld {
		r.drainWarm()
	}
}

// report is the routing as the node's heartbeat and Status show it.
func (r *router) report() (Routing, bool) {
	rt := r.route.Load()
	return Routing(rt.String()), rt.paused != nil
}

// prewarm opens, when the leader announces that the pause is near, as many
// connections to the next database as this node has database/sql
// connections to the old one, so that the requests waiting for the switch do
// not also wait for connection set-up (TCP, TLS, authentication) once it is
// done. Opening them before the pause keeps that work out of the
// stop-the-world window. They are handed out only after the switch; a run
// that ends otherwise, or Close, closes them.
func (r *router) prewarm() {
	r.mu.Lock()
	n := min(len(r.conns), cap(r.warm)) - len(r.warm)
	gen := r.warmGen
	r.mu.Unlock()
	go func() {
		for i := 0; i < n; i++ {
			if r.route.Load().target != toOld {
				return
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			dc, err := r.openNext(ctx)
			cancel()
			if err != nil {
				return
			}
			r.mu.Lock()
			keep := r.warmGen == gen && !r.closed.Load()
			if keep {
				select {
				case r.warm <- dc:
				default:
					keep = false
				}
			}
			r.mu.Unlock()
			if !keep {
				_ = dc.Close()
				return
			}
		}
	}()
}

// drainWarm closes unused pre-opened connections to the next database (and
// stops a prewarm in progress).
func (r *router) drainWarm() {
	r.mu.Lock()
	r.warmGen++
	r.mu.Unlock()
	for {
		select {
		case dc := <-r.warm:
			_ = dc.Close()
		default:
			return
		}
	}
}

// close makes every later connection fail with ErrClosed and drops the
// pre-opened connections.
func (r *router) close() {
	r.mu.Lock()
	r.closed.Store(true)
	r.mu.Unlock()
	r.drainWarm()
}

// ---- The database/sql front end ----

// Connect returns a connection to the database that is live for this node.
// While the switch is being made it waits (honouring ctx) rather than fail.
// It implements driver.Connector: open the service's *sql.DB with
// sql.OpenDB(connector).
func (c *Connector) Connect(ctx context.Context) (driver.Conn, error) {
	dc, err := c.router.connectApp(ctx)
	return dc, c.public(err)
}

func (r *router) connectApp(ctx context.Context) (driver.Conn, error) {
	for {
		rt, err := r.wait(ctx)
		if err != nil {
			return nil, err
		}
		switch rt.target {
		case toNext:
			select {
			case dc := <-r.warm:
				return dc, nil
			default:
			}
			return r.openNext(ctx)
		case refused:
			if time.Since(rt.at) < refreshEvery {
				return nil, rt.err
			}
			r.switched(rt.to)
			if r.route.Load() == rt {
				return nil, rt.err
			}
			continue
		}
		dc, switchedTo, err := r.connectOld(ctx)
		if err != nil || switchedTo == uuid.Nil {
			return dc, err
		}
		r.switched(switchedTo)
	}
}

// openNext opens a database/sql connection to the next database and admits
// it there.
func (r *router) openNext(ctx context.Context) (driver.Conn, error) {
	dc, err := r.sqlNext.Connect(ctx)
	if err != nil {
		return nil, err
	}
	conn := dc.(*stdlib.Conn).Conn()
	_, err = r.admit(ctx, r.next, conn.PgConn())
	if err == nil {
		err = r.afterConnect(ctx, conn)
	}
	if err != nil {
		_ = dc.Close()
		return nil, err
	}
	return dc, nil
}

// connectOld opens a database/sql connection to the old database and admits
// it. If the database was switched away from it closes the connection and
// returns the identity of the database it was switched to.
func (r *router) connectOld(ctx context.Context) (driver.Conn, uuid.UUID, error) {
	dc, err := r.sqlOld.Connect(ctx)
	if err != nil {
		return nil, uuid.Nil, err
	}
	sc := dc.(*stdlib.Conn)
	to, err := r.admit(ctx, r.old, sc.Conn().PgConn())
	if err == nil && to == uuid.Nil {
		err = r.afterConnect(ctx, sc.Conn())
	}
	if err != nil || to != uuid.Nil {
		_ = sc.Close()
		return nil, to, err
	}
	if r.next == nil {
		return sc, uuid.Nil, nil // normal mode: a plain pgx stdlib connection
	}
	cn := &conn{Conn: sc, r: r}
	r.mu.Lock()
	r.conns[cn] = struct{}{}
	if rt := r.route.Load(); rt.target != toOld || rt.paused != nil {
		// Opened while a pause or the switch began: serve this one request,
		// then go (the drain already ran and did not see this connection).
		cn.retire()
	}
	r.mu.Unlock()
	return cn, uuid.Nil, nil
}

// forget removes a closed connection from the set.
func (r *router) forget(cn *conn) {
	r.mu.Lock()
	delete(r.conns, cn)
	r.mu.Unlock()
}

// Driver returns the connector's driver.Driver. Its Open method refuses
// connection strings: use sql.OpenDB(connector).
func (c *Connector) Driver() driver.Driver { return c.drv }

// Driver is the driver.Driver of a Connector.
type Driver struct{ c *Connector }

// Open refuses: a swo connection needs the Connector's state.
func (d *Driver) Open(string) (driver.Conn, error) {
	return nil, errors.New("swo: the swo driver does not open connection strings; use sql.OpenDB(connector)")
}
