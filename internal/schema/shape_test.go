package schema

import (
	"slices"
	"strings"
	"testing"
)

func TestShapeNewPartitions(t *testing.T) {
	t.Parallel()
	before := Shape{
		"table public.m":  "10 p storage 0 …",
		"table public.m1": "11 r storage 1 …",
		"table public.x":  "12 r",
	}
	now := Shape{
		"table public.m":       "10 p storage 0 …",
		"table public.m1":      "11 r storage 1 …",
		"table public.x":       "12 r",
		"table public.m2":      "20 r partition of 10", // premade: moved with the switch
		"table public.m3":      "21 p partition of 10", // partitioned itself: refused
		"table public.other":   "22 r partition of 99", // of a table not moved: refused
		"table public.plain":   "23 r",                 // a new table: refused
		"table public.\"A b\"": "24 r partition of 10", // any name
	}
	oids, changed := before.NewPartitions(now, map[uint32]bool{10: true})
	if !slices.Equal(oids, []uint32{20, 24}) {
		t.Errorf("new partitions %v, want [20 24]", oids)
	}
	for _, want := range []string{"public.m3 was created", "public.other was created", "public.plain was created"} {
		if !strings.Contains(changed, want) {
			t.Errorf("changed %q does not say %q", changed, want)
		}
	}
	if strings.Contains(changed, "m2") || strings.Contains(changed, "A b") {
		t.Errorf("changed %q names a premade partition", changed)
	}
	delete(now, "table public.x")
	if _, changed := before.NewPartitions(now, nil); !strings.Contains(changed, "public.x was dropped") || !strings.Contains(changed, "public.m2 was created") {
		t.Errorf("without moved parents: %q", changed)
	}
}
