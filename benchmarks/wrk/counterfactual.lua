-- wrk script of benchmarks/serving.py and benchmarks/soak.py: POST /counterfactual with n = 1, and a JSON summary
-- when the run ends.
--
--   wrk -t2 -c32 -d10s --timeout 30s -s benchmarks/wrk/counterfactual.lua URL/counterfactual -- MODE MODEL SEED [COUNT]
--   ... -- mixed MODEL SEED COUNT HIT_SHARE MISS_BASE
--
-- MODE "miss": a fresh seed per request (SEED + thread id * 2^32 + a per-thread counter), so every request
--   misses the batch cache; labels cycle with the seed.
-- MODE "hit": the same body every request (seed SEED), which the caller has requested once beforehand.
-- MODE "distinct": each request one of COUNT bodies, seeds SEED .. SEED + COUNT - 1, drawn uniformly at random
--   per request (each thread its own random stream); the caller has requested all of them once beforehand, so
--   every answer is a cache hit over COUNT distinct cached requests. The requests are formatted once, in `init`.
-- MODE "mixed" (the soak): with probability HIT_SHARE one of the COUNT distinct bodies, else a miss whose seed
--   counts up from MISS_BASE as in "miss".
-- The `response` hook counts statuses, 429 answers that carry Retry-After, the X-Cache header, and 2xx and other
-- answers per wall-clock second (which place failures against a soak's fault windows); `done` prints one line
-- "WRK_JSON {...}" with those counts, wrk's latency percentiles (microseconds) and errors.
-- Seeds stay below 2^53, so Lua's doubles hold them exactly. benchmarks/serving.py's `request_body` writes the
-- same bytes for a seed as `body_for` here.

local threads = {}

function setup(thread)
   thread:set("id", #threads)
   table.insert(threads, thread)
end

local function body_for(seed)
   return string.format('{"model":"%s","shape":%d,"texture":%d,"background":%d,"n":1,"seed":%.0f}',
      model, seed % 10, math.floor(seed / 10) % 10, math.floor(seed / 100) % 10, seed)
end

function init(args)
   mode, model, base, count = args[1], args[2], tonumber(args[3]), tonumber(args[4] or "")
   hit_share, miss_base = tonumber(args[5] or ""), tonumber(args[6] or "")
   local needs_count = mode == "distinct" or mode == "mixed"
   if (mode ~= "miss" and mode ~= "hit" and not needs_count) or model == nil or base == nil
      or (needs_count and (count == nil or count < 1))
      or (mode == "mixed" and (hit_share == nil or miss_base == nil)) then
      error("usage: -- miss|hit MODEL SEED, -- distinct MODEL SEED COUNT, or -- mixed MODEL SEED COUNT HIT_SHARE MISS_BASE")
   end
   counter = 0
   statuses, x_cache, retry_after, ok_by_second, other_by_second = {}, {}, 0, {}, {}
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   if mode == "hit" then
      fixed = wrk.format("POST", nil, nil, body_for(base))
   elseif needs_count then
      count = math.floor(count)
      bodies = {}
      for i = 0, count - 1 do
         bodies[i + 1] = wrk.format("POST", nil, nil, body_for(base + i))
      end
      math.randomseed(1 + id + (miss_base or 0) % 2147483647)
      for _ = 1, 10 do
         math.random()  -- the first draws after seeding are poorly mixed on some Lua builds
      end
   end
end

function request()
   if fixed then
      return fixed
   end
   if bodies and (mode == "distinct" or math.random() < hit_share) then
      return bodies[math.random(count)]
   end
   counter = counter + 1
   return wrk.format("POST", nil, nil, body_for((miss_base or base) + id * 4294967296 + counter))
end

function response(status, headers, body)
   local key, second = tostring(status), os.time()
   statuses[key] = (statuses[key] or 0) + 1
   if status >= 200 and status < 300 then
      ok_by_second[second] = (ok_by_second[second] or 0) + 1
   else
      other_by_second[second] = (other_by_second[second] or 0) + 1
   end
   local cache = headers["x-cache"] or headers["X-Cache"]
   if cache then
      x_cache[cache] = (x_cache[cache] or 0) + 1
   end
   if status == 429 and (headers["retry-after"] or headers["Retry-After"]) then
      retry_after = retry_after + 1
   end
end

local function encode(value)
   if type(value) == "table" then
      local parts = {}
      for k, v in pairs(value) do
         table.insert(parts, string.format("%q:%s", tostring(k), encode(v)))
      end
      return "{" .. table.concat(parts, ",") .. "}"
   elseif type(value) == "string" then
      return string.format("%q", value)
   elseif value ~= value or value == math.huge or value == -math.huge then
      return "null"
   end
   return string.format("%.17g", value)
end

local function add(into, counts)
   for k, v in pairs(counts or {}) do
      into[k] = (into[k] or 0) + v
   end
end

function done(summary, latency, requests)
   local all = {statuses = {}, x_cache = {}, ok_by_second = {}, other_by_second = {}}
   local all_retry = 0
   for _, thread in ipairs(threads) do
      for name, into in pairs(all) do
         add(into, thread:get(name))
      end
      all_retry = all_retry + (thread:get("retry_after") or 0)
   end
   local percentiles = {}
   for _, p in ipairs({50, 90, 99, 99.9}) do
      percentiles[tostring(p)] = latency:percentile(p)
   end
   io.write("WRK_JSON " .. encode({
      duration_us = summary.duration, requests = summary.requests, bytes = summary.bytes,
      errors = summary.errors, statuses = all.statuses, x_cache = all.x_cache, retry_after = all_retry,
      ok_by_second = all.ok_by_second, other_by_second = all.other_by_second,
      latency_us = {min = latency.min, max = latency.max, mean = latency.mean, stdev = latency.stdev,
                    percentiles = percentiles},
   }) .. "\n")
end
