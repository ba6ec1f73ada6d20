package cluster

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/google/uuid"
)

// Pure tests of the decisions every node takes from the node list: no database.

func id(n int) uuid.UUID { return uuid.MustParse(fmt.Sprintf("00000000-0000-4000-8000-%012d", n)) }

var (
	nextDB  = uuid.MustParse("11111111-1111-4111-8111-111111111111")
	otherDB = uuid.MustParse("22222222-2222-4222-8222-222222222222")
)

func node(n int, name string, alive, canExec bool, next uuid.UUID, cfgErr string) Node {
	return Node{ID: id(n), Name: name, Alive: alive, CanExec: canExec, NextID: next, ConfigError: cfgErr}
}

// shuffles returns the list, reversed, and a few random orders of it.
func shuffles(nodes []Node, seed uint64) [][]Node {
	out := [][]Node{nodes}
	rev := slices.Clone(nodes)
	slices.Reverse(rev)
	out = append(out, rev)
	rng := rand.New(rand.NewPCG(seed, 7))
	for range 8 {
		s := slices.Clone(nodes)
		rng.Shuffle(len(s), func(i, j int) { s[i], s[j] = s[j], s[i] })
		out = append(out, s)
	}
	return out
}

func TestProblems(t *testing.T) {
	t.Parallel()
	const disagree = "nodes disagree on the next database"
	cases := []struct {
		name  string
		nodes []Node
		// want maps the index of each alive node to a fragment of its
		// problem ("" when valid); nodes not listed must be absent.
		want map[int]string
		// named are texts the disagreement must contain.
		named []string
	}{
		{"empty", nil, map[int]string{}, nil},
		{"one valid node", []Node{node(1, "a", true, true, nextDB, "")}, map[int]string{1: ""}, nil},
		{"all agree", []Node{node(1, "a", true, true, nextDB, ""), node(2, "b", true, false, nextDB, ""), node(3, "c", true, true, nextDB, "")},
			map[int]string{1: "", 2: "", 3: ""}, nil},
		{"dead nodes are left out", []Node{node(1, "a", true, true, nextDB, ""), node(2, "b", false, true, otherDB, ""), node(3, "c", false, true, nextDB, "broken")},
			map[int]string{1: ""}, nil},
		{"own error only on that node", []Node{node(1, "a", true, true, nextDB, ""), node(2, "b", true, true, uuid.Nil, "next database unreachable")},
			map[int]string{1: "", 2: "next database unreachable"}, nil},
		{"own error with another next database is no disagreement",
			[]Node{node(1, "a", true, true, nextDB, ""), node(2, "b", true, true, otherDB, "reaches the same database as --db-url")},
			map[int]string{1: "", 2: "reaches the same database as --db-url"}, nil},
		{"two nodes disagree", []Node{node(1, "a", true, true, nextDB, ""), node(2, "b", true, true, otherDB, "")},
			map[int]string{1: disagree, 2: disagree}, []string{"a -> " + nextDB.String(), "b -> " + otherDB.String(), "--db-url-next"}},
		{"a majority does not win", []Node{node(1, "a", true, true, nextDB, ""), node(2, "b", true, true, nextDB, ""), node(3, "c", true, false, otherDB, "")},
			map[int]string{1: disagree, 2: disagree, 3: disagree}, []string{nextDB.String(), otherDB.String(), "c -> " + otherDB.String()}},
		{"own error wins over the disagreement",
			[]Node{node(1, "a", true, true, nextDB, ""), node(2, "b", true, true, otherDB, ""), node(3, "c", true, true, uuid.Nil, "cannot connect")},
			map[int]string{1: disagree, 2: disagree, 3: "cannot connect"}, []string{nextDB.String(), otherDB.String()}},
		{"a dead node's other database causes no disagreement",
			[]Node{node(1, "a", true, true, nextDB, ""), node(2, "b", true, true, nextDB, ""), node(3, "c", false, true, otherDB, "")},
			map[int]string{1: "", 2: ""}, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			for _, nodes := range shuffles(tc.nodes, uint64(len(tc.name))) {
				got := Problems(nodes)
				if len(got) != len(tc.want) {
					t.Errorf("order %v: %d entries %v, want %d", names(nodes), len(got), got, len(tc.want))
				}
				for i, frag := range tc.want {
					p, ok := got[id(i)]
					switch {
					case !ok:
						t.Errorf("order %v: node %d missing", names(nodes), i)
					case frag == "" && p != "":
						t.Errorf("order %v: node %d has problem %q, want none", names(nodes), i, p)
					case !strings.Contains(p, frag):
						t.Errorf("order %v: node %d: %q does not contain %q", names(nodes), i, p, frag)
					}
					if strings.Contains(p, disagree) {
						for _, n := range tc.named {
							if !strings.Contains(p, n) {
								t.Errorf("order %v: node %d: %q does not name %q", names(nodes), i, p, n)
							}
						}
					}
				}
			}
		})
	}
}

func names(nodes []Node) []string {
	var s []string
	for _, n := range nodes {
		s = append(s, n.Name)
	}
	return s
}

func TestLeader(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name      string
		nodes     []Node
		preferred uuid.UUID
		want      uuid.UUID // uuid.Nil: ErrNoLeader
	}{
		{"preferred alive and able, though not lowest",
			[]Node{node(1, "a", true, true, nextDB, ""), node(5, "e", true, true, nextDB, "")}, id(5), id(5)},
		{"preferred is the lowest", []Node{node(1, "a", true, true, nextDB, ""), node(5, "e", true, true, nextDB, "")}, id(1), id(1)},
		{"preferred dead: lowest alive able",
			[]Node{node(3, "c", true, true, nextDB, ""), node(2, "b", true, true, nextDB, ""), node(9, "p", false, true, nextDB, "")}, id(9), id(2)},
		{"preferred API-only: lowest alive able",
			[]Node{node(4, "d", true, true, nextDB, ""), node(1, "a", true, false, nextDB, ""), node(6, "f", true, true, nextDB, "")}, id(1), id(4)},
		{"preferred unknown", []Node{node(7, "g", true, true, nextDB, ""), node(8, "h", true, true, nextDB, "")}, id(99), id(7)},
		{"no preference", []Node{node(8, "h", true, true, nextDB, ""), node(7, "g", true, true, nextDB, "")}, uuid.Nil, id(7)},
		{"lowest dead", []Node{node(1, "a", false, true, nextDB, ""), node(2, "b", true, true, nextDB, ""), node(3, "c", true, true, nextDB, "")}, uuid.Nil, id(2)},
		{"lowest API-only", []Node{node(1, "a", true, false, nextDB, ""), node(3, "c", true, true, nextDB, ""), node(2, "b", true, true, nextDB, "")}, uuid.Nil, id(2)},
		{"only one able", []Node{node(1, "a", true, false, nextDB, ""), node(2, "b", false, true, nextDB, ""), node(3, "c", true, true, nextDB, "")}, id(1), id(3)},
		{"none alive", []Node{node(1, "a", false, true, nextDB, ""), node(2, "b", false, true, nextDB, "")}, id(1), uuid.Nil},
		{"all API-only", []Node{node(1, "a", true, false, nextDB, ""), node(2, "b", true, false, nextDB, "")}, id(2), uuid.Nil},
		{"empty list", nil, id(1), uuid.Nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			for _, nodes := range shuffles(tc.nodes, uint64(len(tc.name))) {
				got, err := Leader(nodes, tc.preferred)
				if tc.want == uuid.Nil {
					if !errors.Is(err, ErrNoLeader) || got != uuid.Nil {
						t.Errorf("order %v: Leader = %s, %v, want ErrNoLeader", names(nodes), got, err)
					}
					continue
				}
				if err != nil || got != tc.want {
					t.Errorf("order %v: Leader = %s, %v, want %s", names(nodes), got, err, tc.want)
				}
			}
		})
	}
}

// Random node lists: the leader is the preferred node when it may lead, else
// the least id (as bytes) of the alive nodes that may execute, whatever the
// order of the list.
func TestLeaderRandomLists(t *testing.T) {
	t.Parallel()
	rng := rand.New(rand.NewPCG(20250301, 1))
	for round := range 500 {
		var nodes []Node
		for i := range rng.IntN(7) {
			var u uuid.UUID
			for j := range u {
				u[j] = byte(rng.IntN(256))
			}
			nodes = append(nodes, Node{ID: u, Name: fmt.Sprint("n", i), Alive: rng.IntN(3) > 0, CanExec: rng.IntN(3) > 0})
		}
		preferred := uuid.Nil
		if len(nodes) > 0 && rng.IntN(2) == 0 {
			preferred = nodes[rng.IntN(len(nodes))].ID
		}
		var want uuid.UUID
		var able []uuid.UUID
		for _, n := range nodes {
			if n.Alive && n.CanExec {
				able = append(able, n.ID)
			}
		}
		switch {
		case slices.Contains(able, preferred):
			want = preferred
		case len(able) > 0:
			want = slices.MinFunc(able, func(a, b uuid.UUID) int { return bytes.Compare(a[:], b[:]) })
		}
		for _, order := range shuffles(nodes, uint64(round)) {
			got, err := Leader(order, preferred)
			if want == uuid.Nil {
				if !errors.Is(err, ErrNoLeader) {
					t.Fatalf("round %d: Leader = %s, %v, want ErrNoLeader", round, got, err)
				}
				continue
			}
			if err != nil || got != want {
				t.Fatalf("round %d: nodes %+v preferred %s: Leader = %s, %v, want %s", round, order, preferred, got, err, want)
			}
		}
	}
}
