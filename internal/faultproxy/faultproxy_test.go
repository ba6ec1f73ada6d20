package faultproxy

import (
	"context"
	"errors"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgswo/swo/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// proxied starts a proxy in front of a fresh database and returns it with
// the database's URL through it.
func proxied(t *testing.T) (*Proxy, string, *pgtest.Database) {
	t.Helper()
	d := pgtest.NewDatabase(t)
	u, err := url.Parse(d.URL)
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(u.Host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	through, err := p.URL(d.URL)
	if err != nil {
		t.Fatal(err)
	}
	return p, through, d
}

func connect(t *testing.T, ctx context.Context, u string) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// roundTrip times one query (one round trip on an open connection).
func roundTrip(t *testing.T, c *pgx.Conn) time.Duration {
	t.Helper()
	start := time.Now()
	var one int
	if err := c.QueryRow(ctxFor(t, 30*time.Second), "SELECT 1").Scan(&one); err != nil || one != 1 {
		t.Fatalf("SELECT 1: %d, %v", one, err)
	}
	return time.Since(start)
}

func TestForwardsToTheDatabase(t *testing.T) {
	p, through, d := proxied(t)
	if through == d.URL || !strings.Contains(through, p.Addr()) {
		t.Fatalf("URL through the proxy %q", through)
	}
	c := connect(t, ctxFor(t, 10*time.Second), through)
	var name string
	if err := c.QueryRow(ctxFor(t, 10*time.Second), "SELECT current_database()").Scan(&name); err != nil || name != d.Name {
		t.Fatalf("through the proxy: database %q, %v; want %s", name, err, d.Name)
	}
	// Bytes are forwarded unaltered, in bulk, both ways.
	var n int
	var sum string
	if err := c.QueryRow(ctxFor(t, 30*time.Second), "SELECT length(s), md5(s) FROM (SELECT string_agg(md5(i::text), '') s FROM generate_series(1, 100000) i) x").Scan(&n, &sum); err != nil {
		t.Fatal(err)
	}
	var back string
	big := strings.Repeat("0123456789abcdef", 200000)
	if err := c.QueryRow(ctxFor(t, 30*time.Second), "SELECT md5($1)", big).Scan(&back); err != nil {
		t.Fatal(err)
	}
	direct := connect(t, ctxFor(t, 10*time.Second), d.URL)
	var want string
	if err := direct.QueryRow(ctxFor(t, 30*time.Second), "SELECT md5($1)", big).Scan(&want); err != nil || want != back {
		t.Fatalf("md5 of 3.2 MB through the proxy %s, directly %s (%v)", back, want, err)
	}
	if p.Active() != 1 {
		t.Fatalf("Active = %d, want 1", p.Active())
	}
}

func TestLatencyIsAddedToEachDirection(t *testing.T) {
	p, through, _ := proxied(t)
	c := connect(t, ctxFor(t, 10*time.Second), through)
	base := roundTrip(t, c)
	for i := 0; i < 3; i++ {
		base = min(base, roundTrip(t, c))
	}
	const lat = 100 * time.Millisecond
	p.SetLatency(lat)
	slow := roundTrip(t, c)
	t.Logf("round trip: %v without latency, %v with %v each way", base, slow, lat)
	if slow < 2*lat {
		t.Fatalf("round trip with %v latency each way took %v, want at least %v", lat, slow, 2*lat)
	}
	if slow > 2*lat+base+time.Second {
		t.Fatalf("round trip with %v latency each way took %v: more than twice the latency", lat, slow)
	}
	// Latency delays bytes, it does not serialise them: a bulk reply costs
	// about one round trip, not one latency per piece.
	start := time.Now()
	rows, err := c.Query(ctxFor(t, 30*time.Second), "SELECT repeat('x', 1000) FROM generate_series(1, 5000)")
	if err != nil {
		t.Fatal(err)
	}
	got := 0
	for rows.Next() {
		got++
	}
	if rows.Err() != nil || got != 5000 {
		t.Fatalf("5 MB reply: %d rows, %v", got, rows.Err())
	}
	// Serialised, its 160 or more pieces would take 16 s or more.
	if d := time.Since(start); d > 50*lat {
		t.Fatalf("a 5 MB reply took %v with %v latency: bytes are serialised", d, lat)
	}
	p.SetLatency(0)
	if d := roundTrip(t, c); d >= lat {
		t.Fatalf("round trip %v after the latency was removed", d)
	}
}

func TestBlackholeHoldsConnectionsWithoutClosingThem(t *testing.T) {
	p, through, _ := proxied(t)
	c := connect(t, ctxFor(t, 10*time.Second), through)
	roundTrip(t, c)
	p.Blackhole(true)

	// A query on an open connection hangs until its deadline.
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	_, err := c.Exec(ctx, "SELECT 1")
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) && !pgconnTimeout(err) {
		t.Fatalf("query under a blackhole: %v, want the context's deadline", err)
	}
	if d := time.Since(start); d < 290*time.Millisecond {
		t.Fatalf("query under a blackhole ended after %v, before its deadline", d)
	}

	// A new connection is accepted but gets no answer.
	ctx, cancel = context.WithTimeout(context.Background(), 300*time.Millisecond)
	_, err = pgx.Connect(ctx, through)
	cancel()
	if err == nil || !errors.Is(err, context.DeadlineExceeded) && !pgconnTimeout(err) {
		t.Fatalf("connect under a blackhole: %v, want the context's deadline", err)
	}

	// Nothing was closed by the proxy: a query sent during the blackhole
	// completes when it ends, on a connection that stayed open throughout.
	p.Blackhole(false)
	c2 := connect(t, ctxFor(t, 10*time.Second), through)
	roundTrip(t, c2)
	p.Blackhole(true)
	done := make(chan error, 1)
	sent := time.Now()
	go func() {
		_, err := c2.Exec(ctxFor(t, 30*time.Second), "SELECT 1")
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("query answered under a blackhole: %v", err)
	case <-time.After(400 * time.Millisecond):
	}
	if p.Active() < 1 {
		t.Fatalf("Active = %d under a blackhole, want the held connections", p.Active())
	}
	p.Blackhole(false)
	if err := <-done; err != nil {
		t.Fatalf("query held by the blackhole failed when it ended: %v", err)
	}
	if d := time.Since(sent); d < 400*time.Millisecond {
		t.Fatalf("held query answered after %v", d)
	}
	c3 := connect(t, ctxFor(t, 10*time.Second), through)
	roundTrip(t, c3)
}

// pgconnTimeout reports whether err is pgx's report of a timeout (it wraps
// the deadline in its own error types on some paths).
func pgconnTimeout(err error) bool {
	var ne net.Error
	return err != nil && (errors.As(err, &ne) && ne.Timeout() || strings.Contains(err.Error(), "timeout") || strings.Contains(err.Error(), "deadline"))
}

func TestCutAllBreaksOpenConnections(t *testing.T) {
	p, through, _ := proxied(t)
	a := connect(t, ctxFor(t, 10*time.Second), through)
	b := connect(t, ctxFor(t, 10*time.Second), through)
	roundTrip(t, a)
	roundTrip(t, b)
	if p.Active() != 2 {
		t.Fatalf("Active = %d, want 2", p.Active())
	}
	p.CutAll()
	start := time.Now()
	for _, c := range []*pgx.Conn{a, b} {
		if _, err := c.Exec(ctxFor(t, 10*time.Second), "SELECT 1"); err == nil {
			t.Fatal("query on a cut connection succeeded")
		}
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("a cut connection took %v to fail", d)
	}
	waitFor(t, func() bool { return p.Active() == 0 })
	// New connections work.
	roundTrip(t, connect(t, ctxFor(t, 10*time.Second), through))
}

func TestRefuseFailsNewConnections(t *testing.T) {
	p, through, _ := proxied(t)
	open := connect(t, ctxFor(t, 10*time.Second), through)
	p.Refuse(true)
	start := time.Now()
	c, err := pgx.Connect(ctxFor(t, 10*time.Second), through)
	if err == nil {
		c.Close(context.Background())
		t.Fatal("connected through a refusing proxy")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("refused connect took %v", d)
	}
	t.Logf("refused: %v", err)
	roundTrip(t, open) // open connections are untouched
	p.Refuse(false)
	roundTrip(t, connect(t, ctxFor(t, 10*time.Second), through))
}

func TestCloseCutsEverything(t *testing.T) {
	p, through, _ := proxied(t)
	c := connect(t, ctxFor(t, 10*time.Second), through)
	p.Blackhole(true)
	held := make(chan error, 1)
	go func() {
		_, err := pgx.Connect(ctxFor(t, 30*time.Second), through)
		held <- err
	}()
	waitFor(t, func() bool { return p.Active() == 2 })
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-held; err == nil {
		t.Fatal("a connection held by the blackhole survived Close")
	}
	if _, err := c.Exec(ctxFor(t, 10*time.Second), "SELECT 1"); err == nil {
		t.Fatal("an open connection survived Close")
	}
	if _, err := pgx.Connect(ctxFor(t, 10*time.Second), through); err == nil {
		t.Fatal("connected through a closed proxy")
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestRewriteURL(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"postgres://u:p%40ss@db.example:5432/app?sslmode=disable", "postgres://u:p%40ss@127.0.0.1:7777/app?sslmode=disable"},
		{"postgresql://u@[::1]:5432/app", "postgresql://u@127.0.0.1:7777/app"},
		{"postgres://localhost/app", "postgres://127.0.0.1:7777/app"},
	} {
		got, err := RewriteURL(tc.in, "127.0.0.1:7777")
		if err != nil || got != tc.want {
			t.Errorf("RewriteURL(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
	for _, bad := range []string{
		"host=db port=5432 dbname=app",
		"postgres://a:1,b:2/app",
		"postgres://a/app?host=/tmp",
		"postgres:///app",
	} {
		if got, err := RewriteURL(bad, "127.0.0.1:7777"); err == nil {
			t.Errorf("RewriteURL(%q) = %q, want an error", bad, got)
		}
	}
	if _, err := RewriteURL("postgres://a/app", "nowhere"); err == nil {
		t.Error("an address without a port was accepted")
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached within 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
