package swo

import (
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/pgswo/swo/internal/cluster"
	"github.com/pgswo/swo/internal/dsn"
	"github.com/pgswo/swo/internal/meta"
	"github.com/pgswo/swo/internal/msglog"
)

// Connector is a database/sql driver.Connector. Open the service's *sql.DB
// with sql.OpenDB(connector).
//
// In normal mode it hands out plain pgx stdlib connections to the old
// database. In switchover mode it hands out connections to the old database
// until the switch commits, then only to the new one; while the switch is
// being made new connections wait rather than fail.
type Connector struct {
	cfg  Config
	log  *slog.Logger
	id   uuid.UUID // this node
	keys lockKeys
	meta meta.Store
	old  *endpoint
	next *endpoint // nil in normal mode
	drv  *Driver

	// route says where new connections go; read on every Connect, changed
	// (rarely) under mu.
	route atomic.Pointer[route]
	mu    sync.Mutex
	conns map[*conn]struct{} // application connections to the old database (switchover mode)

	stateMu   sync.Mutex
	configErr error // why this node's configuration is invalid; nil if valid
	lastErr   error
	infoMu    sync.RWMutex // guards next.info, which a recheck may update
	// lastRecheck is when follow last re-examined an invalid configuration
	// (only follow uses it).
	lastRecheck time.Time

	// Cluster (switchover mode): the message log and node table in the old
	// database, and this node's view of them, maintained by follow.
	msgs        msglog.Log
	nodes       cluster.Table
	wake        chan struct{}
	warm        chan driver.Conn // connections to the next database opened before the pause
	warmGen     atomic.Int64     // bumped when warm connections are dropped: stops a prewarm in progress
	reactMu     sync.Mutex       // serialises observe
	viewMu      sync.Mutex
	view        view
	viewChanged chan struct{} // closed and replaced at every state change

	leadMu    sync.Mutex
	leading   *leaderRun   // the run this node leads, if any
	resetting atomic.Int64 // the run this node's Reset is working on, if any

	// testHook, if set, is called by the leader at each phase boundary;
	// tests use it to inject faults at exact points.
	testHook func(ctx context.Context, phase string)

	closed atomic.Bool
	cancel context.CancelFunc
	bg     sync.WaitGroup
}

// endpoint is one configured database.
type endpoint struct {
	label string // "old" or "next"
	cfg   *pgx.ConnConfig
	app   driver.Connector // pgx stdlib connector for application connections
	info  meta.Info        // as read when the connector started
}

// Connection roles, shown in application_name.
const (
	roleApp       = "app"        // application connection, switchover mode
	roleAppNormal = "app-normal" // application connection, normal mode (no --db-url-next)
	roleCtl       = "ctl"        // the node's own control connection (never holds the connection lock)
	roleSync      = "sync"       // data sync worker
	roleLock      = "lock"       // the executor's stop-the-world lock session
	roleVerify    = "verify"     // Verify's sessions
)

// target of new connections.
const (
	toOld = iota
	toNext
	refused
)

type route struct {
	target int
	err    error         // when refused
	paused chan struct{} // non-nil while paused; closed when the pause ends
}

func (r *route) String() string {
	return [...]string{"old", "next", "refused"}[r.target]
}

// NewConnector checks the configuration, connects to the configured
// databases, and returns a connector. In switchover mode it creates the
// library's schema in both databases if needed and joins the cluster.
//
// It fails with an error wrapping ErrObsolete when OldURL names a database
// that was switched away from (in switchover mode: unless NextURL is the
// database it was switched to, which is then used), or NextURL names one.
func NewConnector(ctx context.Context, cfg Config) (*Connector, error) {
	cfg = cfg.withDefaults()
	p, err := cfg.parse()
	if err != nil {
		return nil, err
	}
	c := &Connector{
		cfg:   cfg,
		id:    uuid.New(),
		keys:  newLockKeys(cfg.Namespace),
		old:   p.old,
		next:  p.next,
		conns: make(map[*conn]struct{}),
	}
	c.log = cfg.Logger.With("swo.node", cfg.NodeName)
	c.meta = meta.New(cfg.Namespace, c.keys.pair(lockSetup))
	c.msgs = msglog.Log{Table: c.meta.Table("log"), Channel: cfg.Namespace, Lock: c.keys.pair(lockSetup)}
	c.nodes = cluster.Table{Name: c.meta.Table("nodes")}
	c.wake = make(chan struct{}, 1)
	c.warm = make(chan driver.Conn, 32)
	c.viewChanged = make(chan struct{})
	c.view.At = map[string]time.Time{}
	c.drv = &Driver{c: c}
	if c.next == nil {
		c.old.app = c.appConnector(c.old, roleAppNormal)
	} else {
		c.old.app = c.appConnector(c.old, roleApp)
		c.next.app = c.appConnector(c.next, roleApp)
	}
	c.route.Store(&route{target: toOld})
	bgCtx, cancel := context.WithCancel(context.Background())
	c.cancel = cancel
	if c.next == nil {
		err = c.startNormal(ctx)
	} else {
		err = c.startSwitchover(ctx, bgCtx)
	}
	if err != nil {
		c.closed.Store(true)
		cancel()
		c.bg.Wait()
		return nil, err
	}
	return c, nil
}

// appConnector builds the pgx stdlib connector for application connections.
func (c *Connector) appConnector(e *endpoint, role string) driver.Connector {
	cfg := e.cfg.Copy()
	cfg.RuntimeParams["application_name"] = c.appName(e, role)
	return stdlib.GetConnector(*cfg)
}

// appName is the application_name of a connection: the one configured in the
// URL if any, then "<namespace>:<role>:<node>" ("swo:app:web-1" by default),
// cut to PostgreSQL's 63 bytes. The namespace keeps two deployments' sessions
// apart when RESET ends a stuck run's sessions.
func (c *Connector) appName(e *endpoint, role string) string {
	name := c.cfg.Namespace + ":" + role + ":" + c.cfg.NodeName
	if base := e.cfg.RuntimeParams["application_name"]; base != "" {
		name = base + " " + name
	}
	if len(name) > 63 {
		name = name[:63]
	}
	return name
}

// connect opens a pgx connection to e for the library's own use. Its
// transactions are READ COMMITTED whatever the role's or the database's
// default: the library's statements that wait for a lock (the message log's
// append, the switch state's read) must read what committed during the wait.
func (c *Connector) connect(ctx context.Context, e *endpoint, role string) (*pgx.Conn, error) {
	cfg := e.cfg.Copy()
	cfg.RuntimeParams["application_name"] = c.appName(e, role)
	cfg.RuntimeParams["default_transaction_isolation"] = "read committed"
	cfg.RuntimeParams["jit"] = "off" // the library's queries are short: compiling them would cost more than running them
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, c.scrub(fmt.Errorf("connect to %s database %s: %w", e.label, dsn.Describe(e.cfg), err))
	}
	return conn, nil
}

func (c *Connector) startNormal(ctx context.Context) error {
	conn, err := c.connect(ctx, c.old, roleCtl)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	info, ok, err := c.meta.Read(ctx, conn)
	if err != nil {
		return c.scrub(fmt.Errorf("swo: read state of %s: %w", dsn.Describe(c.old.cfg), err))
	}
	c.old.info = info
	if ok && info.Obsolete() {
		return c.obsolete(c.old, info)
	}
	return nil
}

func (c *Connector) startSwitchover(ctx, bgCtx context.Context) error {
	oldConn, err := c.connect(ctx, c.old, roleCtl)
	if err != nil {
		return err
	}
	c.old.info, err = c.meta.Ensure(ctx, oldConn, c.msgs.DDL(), c.nodes.DDL())
	if err != nil {
		oldConn.Close(context.Background())
		return c.scrub(fmt.Errorf("swo: old database %s: %w", dsn.Describe(c.old.cfg), err))
	}
	nextConn, nerr := c.connect(ctx, c.next, roleCtl)
	if nerr == nil {
		defer nextConn.Close(context.Background())
		c.next.info, nerr = c.meta.Ensure(ctx, nextConn)
		if nerr != nil {
			nerr = c.scrub(fmt.Errorf("next database %s: %w", dsn.Describe(c.next.cfg), nerr))
		}
	}
	old, next := c.old.info, c.next.info
	switch {
	case old.Obsolete() && nerr != nil:
		oldConn.Close(context.Background())
		return fmt.Errorf("swo: the old database was switched over to database %s, which cannot be reached: %w", old.SwitchedTo, nerr)
	case old.Obsolete() && (old.SwitchedTo != next.ID || next.Obsolete()):
		oldConn.Close(context.Background())
		return c.obsolete(c.old, old)
	case old.Obsolete():
		// The switch is done and NextURL is the new database: use it.
		oldConn.Close(context.Background())
		c.route.Store(&route{target: toNext})
		c.log.Info("swo: old database was already switched over; using the next database", "next", dsn.Describe(c.next.cfg))
		return nil
	case nerr != nil:
		c.setConfigErr(nerr)
	case next.Obsolete():
		oldConn.Close(context.Background())
		return c.obsolete(c.next, next)
	case old.ID == next.ID:
		if err := c.separateTwins(ctx, oldConn, nextConn); err != nil {
			c.setConfigErr(err)
		}
	}
	c.bg.Add(1)
	go c.follow(bgCtx, oldConn)
	return nil
}

// nextInfo returns what the connector knows of the next database.
func (c *Connector) nextInfo() meta.Info {
	c.infoMu.RLock()
	defer c.infoMu.RUnlock()
	return c.next.info
}

// recheckNext re-examines the next database while this node's configuration
// is invalid (say it was unreachable when the node started), so that the
// node becomes valid once the cause is gone, without a restart.
func (c *Connector) recheckNext(ctx context.Context, oldConn *pgx.Conn) {
	err := func() error {
		nextConn, err := c.connect(ctx, c.next, roleCtl)
		if err != nil {
			return err
		}
		defer closeBounded(nextConn)
		info, err := c.meta.Ensure(ctx, nextConn)
		if err != nil {
			return c.scrub(fmt.Errorf("next database %s: %w", dsn.Describe(c.next.cfg), err))
		}
		if info.Obsolete() {
			return c.obsolete(c.next, info)
		}
		c.infoMu.Lock()
		c.next.info = info
		c.infoMu.Unlock()
		if info.ID == c.old.info.ID {
			return c.separateTwins(ctx, oldConn, nextConn)
		}
		return nil
	}()
	c.stateMu.Lock()
	c.configErr = c.scrub(err)
	c.stateMu.Unlock()
	if err == nil {
		c.log.Info("swo: this node's configuration is valid now", "next_db_id", c.nextInfo().ID)
	}
}

// separateTwins handles two databases with the same identity: either both
// URLs reach one database (a configuration error), or the next database was
// restored from a copy of the old one and gets an identity of its own.
func (c *Connector) separateTwins(ctx context.Context, oldConn, nextConn *pgx.Conn) error {
	same, err := c.sameDatabase(ctx, oldConn, nextConn)
	if err != nil {
		return err
	}
	if same {
		return fmt.Errorf("%w: --db-url and --db-url-next reach the same database (%s): point --db-url-next at the new database",
			ErrConfig, c.old.info.ID)
	}
	id, err := c.meta.NewIdentity(ctx, nextConn)
	if err != nil {
		return err
	}
	c.log.Warn("swo: next database carried a copy of the old database's identity; gave it a new one", "next_db_id", id)
	c.infoMu.Lock()
	c.next.info.ID = id
	c.infoMu.Unlock()
	return nil
}

func (c *Connector) obsolete(e *endpoint, info meta.Info) error {
	return fmt.Errorf("%w: %s (database %s) was switched over to database %s at %s; "+
		"restart with --db-url pointing at the new database", ErrObsolete, dsn.Describe(e.cfg), info.ID,
		info.SwitchedTo, info.SwitchedAt.UTC().Format(time.RFC3339))
}

// Connect returns a connection to the database that is live for this node.
// While the switch is being made it waits (honouring ctx) rather than fail.
func (c *Connector) Connect(ctx context.Context) (driver.Conn, error) {
	for {
		if c.closed.Load() {
			return nil, ErrClosed
		}
		r := c.route.Load()
		if r.paused != nil {
			select {
			case <-r.paused:
				continue
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		switch r.target {
		case toNext:
			select {
			case dc := <-c.warm:
				return dc, nil
			default:
			}
			dc, err := c.next.app.Connect(ctx)
			return dc, c.scrub(err)
		case refused:
			return nil, r.err
		}
		dc, switchedTo, err := c.connectOld(ctx)
		if err != nil {
			return nil, err
		}
		if switchedTo == uuid.Nil {
			return dc, nil
		}
		c.switched(switchedTo)
	}
}

// connectOld opens an application connection to the old database: it takes
// the shared connection lock and then, in a separate statement, reads the
// switch state (see lock.go for why the order and the separation matter). If
// the database was switched away from it closes the connection and returns the
// identity of the database it was switched to.
func (c *Connector) connectOld(ctx context.Context) (driver.Conn, uuid.UUID, error) {
	dc, err := c.old.app.Connect(ctx)
	if err != nil {
		return nil, uuid.Nil, c.scrub(err)
	}
	sc := dc.(*stdlib.Conn)
	to, err := c.readSwitchedTo(ctx, sc.Conn().PgConn())
	if err != nil || to != uuid.Nil {
		_ = sc.Close()
		if err != nil {
			return nil, uuid.Nil, c.scrub(fmt.Errorf("swo: check state of %s: %w", dsn.Describe(c.old.cfg), err))
		}
		if c.next == nil {
			info := c.old.info
			info.SwitchedTo, info.SwitchedAt = to, time.Now()
			return nil, uuid.Nil, c.obsolete(c.old, info)
		}
		return nil, to, nil
	}
	if c.next == nil {
		return sc, uuid.Nil, nil // normal mode: a plain pgx stdlib connection
	}
	cn := &conn{Conn: sc, c: c}
	c.mu.Lock()
	c.conns[cn] = struct{}{}
	if r := c.route.Load(); r.target != toOld || r.paused != nil {
		// Opened while a pause or the switch began: serve this one request,
		// then go (the drain already ran and did not see this connection).
		cn.retire()
	}
	c.mu.Unlock()
	return cn, uuid.Nil, nil
}

// unsafeSingleStatementRead makes connectOld read the switch state in the
// statement that waits for the lock: the mistake lock.go warns about. Only
// the negative-control test sets it, to show that the test catches it.
var unsafeSingleStatementRead bool

// readSwitchedTo takes the shared connection lock, then reads switched_to, in
// one round trip of two statements.
func (c *Connector) readSwitchedTo(ctx context.Context, pc *pgconn.PgConn) (uuid.UUID, error) {
	if unsafeSingleStatementRead && c.next != nil {
		res, err := pc.Exec(ctx, fmt.Sprintf("SELECT (%s) FROM (%s) l", c.meta.SwitchedToQuery(), c.keys.connSharedSQL())).ReadAll()
		if err != nil || len(res) != 1 || len(res[0].Rows) != 1 || res[0].Rows[0][0] == nil {
			return uuid.Nil, err
		}
		return uuid.ParseBytes(res[0].Rows[0][0])
	}
	// An explicit READ COMMITTED transaction: under a default isolation level
	// of REPEATABLE READ or SERIALIZABLE (set for the role or the database),
	// the implicit transaction of a multi-statement query would take its
	// snapshot before the lock wait and miss a switch committed meanwhile.
	q := "BEGIN ISOLATION LEVEL READ COMMITTED; " + c.keys.connSharedSQL() + "; "
	if c.next != nil {
		q += c.meta.SwitchedToQuery()
	} else {
		// Normal mode: the schema may not exist, and nothing may be created.
		q += fmt.Sprintf("SELECT to_regclass('%s.meta') IS NOT NULL", c.meta.Schema())
	}
	res, err := pc.Exec(ctx, q+"; COMMIT").ReadAll()
	if err != nil {
		return uuid.Nil, err
	}
	if len(res) != 4 || len(res[2].Rows) != 1 {
		return uuid.Nil, fmt.Errorf("unexpected reply to the state check (%d results)", len(res))
	}
	v := res[2].Rows[0][0]
	if c.next == nil {
		if string(v) != "t" {
			return uuid.Nil, nil
		}
		res, err := pc.Exec(ctx, c.meta.SwitchedToQuery()).ReadAll()
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

// switched moves the node to the new database: new connections go there,
// every application connection to the old database is retired.
func (c *Connector) switched(to uuid.UUID) {
	r := &route{target: toNext}
	if next := c.nextInfo().ID; to != next {
		info := c.old.info
		info.SwitchedTo = to
		r = &route{target: refused, err: fmt.Errorf("%w (and not to --db-url-next's database %s)", c.obsolete(c.old, info), next)}
	}
	if c.setRoute(r) {
		c.log.Info("swo: switched: new connections go to the next database", "routing", r.String())
		time.AfterFunc(time.Minute, c.drainWarm) // what the pool did not need by then
	}
}

// setRoute replaces the route, ends a pause, and retires the old database's
// connections unless the new route still goes to it. It reports whether the
// route changed.
func (c *Connector) setRoute(r *route) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	prev := c.route.Load()
	if prev.target == r.target && prev.paused == r.paused {
		return false
	}
	if prev.target != toOld && r.target == toOld {
		return false // a switch is never undone
	}
	c.route.Store(r)
	if prev.paused != nil && prev.paused != r.paused {
		close(prev.paused)
	}
	if r.target != toOld || r.paused != nil {
		for cn := range c.conns {
			cn.retire()
		}
	}
	return true
}

// pause makes new connections wait and drains the old database's connections:
// idle ones are closed now, busy ones when they are returned. The pause ends
// with resume, with the switch, or by itself at until, whichever comes first;
// ending by itself is safe because a connection to the old database still
// waits for the connection lock and then reads the switch state.
func (c *Connector) pause(until time.Time) {
	r := &route{target: toOld, paused: make(chan struct{})}
	if !c.setRoute(r) {
		return
	}
	time.AfterFunc(time.Until(until), func() {
		if c.route.Load() == r {
			c.resume()
		}
	})
}

// prewarm opens, when the leader announces that the pause is near, as many
// connections to the next database as this node has to the old one, so that
// the requests waiting for the switch do not also wait for connection set-up
// (TCP, TLS, authentication) once it is done. Opening them before the pause
// keeps that work out of the stop-the-world window. They are handed out only
// after the switch; a run that ends otherwise closes them.
func (c *Connector) prewarm() {
	c.mu.Lock()
	n := min(len(c.conns), cap(c.warm)) - len(c.warm)
	c.mu.Unlock()
	gen := c.warmGen.Load()
	go func() {
		for i := 0; i < n; i++ {
			if c.route.Load().target != toOld || c.warmGen.Load() != gen || c.closed.Load() {
				return
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			dc, err := c.next.app.Connect(ctx)
			cancel()
			if err != nil {
				return
			}
			select {
			case c.warm <- dc:
			default:
				_ = dc.Close()
				return
			}
		}
	}()
}

// drainWarm closes unused pre-opened connections to the next database (and
// stops a prewarm in progress).
func (c *Connector) drainWarm() {
	c.warmGen.Add(1)
	for {
		select {
		case dc := <-c.warm:
			_ = dc.Close()
		default:
			return
		}
	}
}

// resume ends a pause, or a run, without a switch.
func (c *Connector) resume() {
	r := c.route.Load()
	if r.paused != nil {
		c.setRoute(&route{target: r.target})
	}
	if r.target == toOld {
		c.drainWarm()
	}
}

// forget removes a closed connection from the set.
func (c *Connector) forget(cn *conn) {
	c.mu.Lock()
	delete(c.conns, cn)
	c.mu.Unlock()
}

// Driver returns the connector's driver.Driver. Its Open method refuses
// connection strings: use sql.OpenDB(connector).
func (c *Connector) Driver() driver.Driver { return c.drv }

// Close stops the connector's background work. database/sql calls it from
// DB.Close. Connect fails with ErrClosed afterwards.
func (c *Connector) Close() error {
	if !c.closed.CompareAndSwap(false, true) {
		return nil
	}
	c.stopLeading(true)
	c.cancel()
	c.bg.Wait()
	c.drainWarm()
	if c.next != nil && c.route.Load().target == toOld {
		// Leave the node list at once rather than by timeout.
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if conn, err := c.connect(ctx, c.old, roleCtl); err == nil {
			_ = c.nodes.Remove(ctx, conn, c.id)
			conn.Close(ctx)
		}
	}
	return nil
}

// Driver is the driver.Driver of a Connector.
type Driver struct{ c *Connector }

// Open refuses: a swo connection needs the Connector's state.
func (d *Driver) Open(string) (driver.Conn, error) {
	return nil, errors.New("swo: the swo driver does not open connection strings; use sql.OpenDB(connector)")
}

func dbStatus(e *endpoint) DatabaseStatus {
	return DatabaseStatus{Addr: dsn.Describe(e.cfg), ID: idString(e.info.ID), Obsolete: e.info.Obsolete()}
}

func idString(id uuid.UUID) string {
	if id == uuid.Nil {
		return ""
	}
	return id.String()
}

func (c *Connector) setConfigErr(err error) {
	err = c.scrub(err)
	c.stateMu.Lock()
	c.configErr = err
	c.stateMu.Unlock()
	c.log.Error("swo: this node's configuration is not valid; EXECUTE is refused until it is fixed", "error", err)
}

func (c *Connector) noteErr(err error) {
	err = c.scrub(err)
	c.stateMu.Lock()
	c.lastErr = err
	c.stateMu.Unlock()
	c.log.Warn(err.Error())
}

// scrub makes sure no configured password appears in err's message, keeping
// err's chain for errors.Is and errors.As.
func (c *Connector) scrub(err error) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	clean := dsn.Scrub(msg, c.passwords()...)
	if clean == msg {
		return err
	}
	return &scrubbedError{msg: clean, err: err}
}

func (c *Connector) passwords() []string {
	p := []string{c.old.cfg.Password}
	if c.next != nil {
		p = append(p, c.next.cfg.Password)
	}
	return p
}

type scrubbedError struct {
	msg string
	err error
}

func (e *scrubbedError) Error() string { return e.msg }
func (e *scrubbedError) Unwrap() error { return e.err }
