"""The PCA sky in a browser: one self-contained HTML page (plotly.js inline, WebGL).

Every token is a point of a ``scattergl`` trace (one per category) on the Hammer projection
(equal-area: the density of points on the page is the density on the sky), computed in the
page from lat/lon: x = 2 sqrt2 cos(lat) sin(lon/2) / w, y = sqrt2 sin(lat) / w,
w = sqrt(1 + cos(lat) cos(lon/2)), in units where the whole sky spans x in [-2 sqrt2, 2 sqrt2].
A graticule every 30 degrees is drawn and labelled.  Hovering a point shows its id, string,
category, lat, lon, r and exact-duplicate group; the detected regions (and a task's own box)
are outlined and listed in a table with their override lines; a box (or lasso) selection shows
the override line of the box that holds the selected tokens (``bbox.lat_min=... bbox.r_max=...``;
a selection through +/-180 degrees gives ``lon_min > lon_max``).

The page is lean so that 151,936 tokens open in a few seconds: the numbers travel as
base64-encoded little-endian typed arrays (float32 lat, lon, r and the projected x, y; int32
id and group), decoded with ``atob`` into ``Float32Array``/``Int32Array`` without a JSON number
parse; the rows are sorted by category, so each WebGL trace takes zero-copy ``subarray`` views
of x and y; the token strings are one JSON array, and a hover label is built from the columns
only for the point under the mouse (no per-point text array).  With plotly.js (4.6 MB) embedded
the whole page is ~11 MB for Qwen3-4B's vocabulary; it works offline and as an MLflow artifact.
"""
from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from embdist.atomic import write_bytes
from embdist.regions import BOX_KEYS, override_line

COLOURS = {"normal": "#1f77b4", "special": "#d62728", "unused": "#ff7f0e", "byte": "#2ca02c",
           "beyond_vocab": "#9467bd", "unknown": "#7f7f7f"}


def plotly_js() -> str:
    import plotly

    return (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_text(encoding="utf-8")


def _b64(a, dtype) -> str:
    """A column as base64 of its little-endian bytes (decoded in the page into a typed array)."""
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).decode("ascii")


def hammer(lat, lon) -> tuple[np.ndarray, np.ndarray]:
    """The Hammer projection of the page (whole sky: x in [-2 sqrt2, 2 sqrt2], y in [-sqrt2, sqrt2])."""
    p, l = np.radians(np.asarray(lat, np.float64)), np.radians(np.asarray(lon, np.float64))
    w = np.sqrt(1 + np.cos(p) * np.cos(l / 2))
    return 2 * np.sqrt(2) * np.cos(p) * np.sin(l / 2) / w, np.sqrt(2) * np.sin(p) / w


def _box_json(b) -> dict:
    """The six numbers; an unbounded r_max (inf) is null in JSON (the drawing uses lat/lon only)."""
    return {k: (float(b[k]) if np.isfinite(float(b[k])) else None) for k in BOX_KEYS}


def write_sky_html(path: str | os.PathLike, *, ids, lat, lon, r, strings: Sequence[str], categories: Sequence[str],
                   groups, regions: Sequence[dict] = (), box: dict | None = None, title: str = "PCA sky") -> Path:
    """Write the page. ``regions``: dicts with rank, the six box keys, tokens, expected,
    significance; ``box``: a task's own box (drawn in black). Returns the path."""
    n = len(ids)
    if not (len(lat) == len(lon) == len(r) == len(strings) == len(categories) == len(groups) == n):
        raise ValueError("ids, lat, lon, r, strings, categories and groups must have one length")
    cats = sorted(set(categories), key=lambda c: (c != "normal", c))
    cat_index = {c: i for i, c in enumerate(cats)}
    code = np.array([cat_index[c] for c in categories], dtype=np.int64)
    order = np.argsort(code, kind="stable")  # rows grouped by category: one contiguous slice per trace
    lat, lon, r = (np.asarray(v, np.float64)[order] for v in (lat, lon, r))
    x, y = hammer(lat, lon)
    x, y = (np.where(np.isfinite(v), v, np.nan) for v in (x, y))
    data = {
        "n": n, "counts": np.bincount(code, minlength=len(cats)).tolist(),
        "id": _b64(np.asarray(ids, dtype=np.int64)[order], "i4"), "g": _b64(np.asarray(groups, dtype=np.int64)[order], "i4"),
        "lat": _b64(lat, "f4"), "lon": _b64(lon, "f4"), "r": _b64(r, "f4"), "x": _b64(x, "f4"), "y": _b64(y, "f4"),
        "s": [strings[i] for i in order],
        "cats": cats, "colours": [COLOURS.get(c, "#17becf") for c in cats],
        "regions": [{**_box_json(g), "rank": int(g["rank"]), "tokens": int(g["tokens"]),
                     "expected": float(g["expected"]), "significance": float(g["significance"]),
                     "override": override_line(g)} for g in regions],
        "box": None if box is None else {**_box_json(box), "override": override_line(box)},
    }
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    payload = payload.replace("</", "<\\/")  # a token string must not close the script element
    page = _TEMPLATE.replace("@@TITLE@@", html.escape(title)).replace("@@PLOTLY@@", plotly_js()) \
        .replace("@@DATA@@", payload)
    return write_bytes(path, page.encode("utf-8"))


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>@@TITLE@@</title>
<style>
body{font-family:system-ui,sans-serif;margin:12px;color:#222}
#sky{width:100%;height:640px}
#override{background:#f4f4f4;padding:6px;font-size:13px;white-space:pre-wrap;min-height:1.2em}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
td.o{text-align:left;font-family:monospace}
</style>
<script>@@PLOTLY@@</script>
</head><body>
<h3>@@TITLE@@</h3>
<div>Hammer equal-area projection of the PCA sky; hover a point for the token, drag a box (or lasso) to get its override line.</div>
<div id="sky"></div>
<div>Selection: <span id="nsel">none</span></div>
<pre id="override"></pre>
<table id="regions"><thead><tr><th>region</th><th>tokens</th><th>expected</th><th>sigma</th><th>override line</th></tr></thead><tbody></tbody></table>
<script id="skydata" type="application/json">@@DATA@@</script>
<script>
(function(){
const T0=performance.now();
const D = JSON.parse(document.getElementById('skydata').textContent);
const R = Math.PI/180, S2 = Math.SQRT2;
function hammer(lat, lon){const p=lat*R,l=lon*R,w=Math.sqrt(1+Math.cos(p)*Math.cos(l/2));
  return [2*S2*Math.cos(p)*Math.sin(l/2)/w, S2*Math.sin(p)/w];}
function line(pts){const x=[],y=[];for(const [la,lo] of pts){const q=hammer(la,lo);x.push(q[0]);y.push(q[1]);}return [x,y];}
function seg(a,b,n){const o=[];for(let i=0;i<=n;i++)o.push(a+(b-a)*i/n);return o;}
const traces=[];
// graticule
for(let lo=-180;lo<=180;lo+=30){const [x,y]=line(seg(-90,90,60).map(la=>[la,lo]));
  traces.push({type:'scatter',mode:'lines',x:x,y:y,line:{color:lo%180===0?'#999':'#ddd',width:1},hoverinfo:'skip',showlegend:false,meta:'grid'});}
for(let la=-60;la<=60;la+=30){const [x,y]=line(seg(-180,180,120).map(lo=>[la,lo]));
  traces.push({type:'scatter',mode:'lines',x:x,y:y,line:{color:la===0?'#999':'#ddd',width:1},hoverinfo:'skip',showlegend:false,meta:'grid'});}
const ann=[];
for(let la=-60;la<=60;la+=30){const q=hammer(la,-180);ann.push({x:q[0],y:q[1],text:la+'°',showarrow:false,xanchor:'right',font:{size:10}});}
for(let lo=-150;lo<=150;lo+=30){const q=hammer(0,lo);ann.push({x:q[0],y:q[1],text:lo+'°',showarrow:false,yanchor:'top',font:{size:9,color:'#666'}});}
ann.push({x:0,y:-1.55,text:'longitude (°)',showarrow:false},{x:-2.95,y:0,text:'latitude (°)',showarrow:false,textangle:-90});
// columns: base64 little-endian typed arrays
function col(b64,T){const s=atob(b64),u=new Uint8Array(s.length);for(let i=0;i<s.length;i++)u[i]=s.charCodeAt(i);return new T(u.buffer);}
D.id=col(D.id,Int32Array);D.g=col(D.g,Int32Array);D.lat=col(D.lat,Float32Array);D.lon=col(D.lon,Float32Array);
D.r=col(D.r,Float32Array);const X=col(D.x,Float32Array),Y=col(D.y,Float32Array);
const f3=v=>Number.isFinite(v)?Number(v.toFixed(3)):v, f5=v=>Number.isFinite(v)?Number(v.toPrecision(5)):v;
function label(i,cat){return 'id '+D.id[i]+' '+JSON.stringify(D.s[i])+'<br>'+cat+'<br>lat '+f3(D.lat[i])+' lon '+f3(D.lon[i])+
  ' r '+f5(D.r[i])+'<br>group '+D.g[i];}
// points: one WebGL trace per category, zero-copy views of x and y; the hover text is an
// array-like (a Proxy) that builds a label only for the point asked for (the one under the mouse)
function labels(a,m,cat){return new Proxy(new Array(m),{get(t,p){
  if(typeof p==='string'&&p.length&&p.charCodeAt(0)>=48&&p.charCodeAt(0)<=57){const j=+p;return j<m?label(a+j,cat):undefined;}
  return Reflect.get(t,p);}});}
const n=D.n, start={};let a=0;
const ptrace=[];
D.cats.forEach((cat,k)=>{const m=D.counts[k];if(!m){return;}
  start[traces.length]=a;ptrace.push(traces.length);
  traces.push({type:'scattergl',mode:'markers',name:cat+' ('+m+')',x:X.subarray(a,a+m),y:Y.subarray(a,a+m),
    text:labels(a,m,cat),hoverinfo:'text',marker:{size:3,color:D.colours[k],opacity:0.6},meta:'points',cat:cat});
  a+=m;});
// boxes: edges sampled along lat/lon, split where they wrap through +/-180
function boxPaths(b){const lo1=b.lon_max>=b.lon_min?b.lon_max:b.lon_max+360, p=[];
  const lons=seg(b.lon_min,lo1,90), lats=seg(b.lat_min,b.lat_max,45);
  p.push(lons.map(lo=>[b.lat_min,lo]),lons.map(lo=>[b.lat_max,lo]));
  if(!(b.lon_min<=-180&&b.lon_max>=180)){p.push(lats.map(la=>[la,b.lon_min]),lats.map(la=>[la,lo1]));}
  const out=[];for(const path of p){let cur=[];for(const [la,lo] of path){const L=lo>180?lo-360:lo;
    if(cur.length&&Math.abs(L-cur[cur.length-1][1])>180){out.push(cur);cur=[];}cur.push([la,L]);}out.push(cur);}
  return out;}
function drawBox(b,colour,label){boxPaths(b).forEach((path,j)=>{const [x,y]=line(path);
  traces.push({type:'scatter',mode:'lines',x:x,y:y,line:{color:colour,width:2},name:label,legendgroup:label,showlegend:j===0,hoverinfo:'name',meta:'box'});});}
D.regions.forEach(g=>drawBox(g,'#d62728','region '+g.rank));
if(D.box)drawBox(D.box,'#000','box');
const tb=document.querySelector('#regions tbody');
D.regions.forEach(g=>{const tr=document.createElement('tr');
  tr.innerHTML='<td>'+g.rank+'</td><td>'+g.tokens+'</td><td>'+g.expected.toFixed(1)+'</td><td>'+g.significance.toFixed(1)+'</td><td class="o"></td>';
  tr.lastChild.textContent=g.override;tb.appendChild(tr);});
const layout={xaxis:{visible:false,range:[-3.05,2.95]},yaxis:{visible:false,range:[-1.6,1.5],scaleanchor:'x'},
  annotations:ann,dragmode:'select',hovermode:'closest',margin:{l:10,r:10,t:10,b:10},legend:{x:1,y:1}};
const gd=document.getElementById('sky');
function fmt(v){return Number(v.toPrecision(6)).toString();}
const T1=performance.now();
Plotly.newPlot(gd,traces,layout,{responsive:true,displaylogo:false}).then(()=>{
  gd.on('plotly_selected',ev=>{const out=document.getElementById('override'),ns=document.getElementById('nsel');
    if(!ev||!ev.points||!ev.points.length){out.textContent='';ns.textContent='none';return;}
    const idx=ev.points.filter(p=>p.data.meta==='points').map(p=>start[p.curveNumber]+p.pointIndex);
    if(!idx.length){out.textContent='';ns.textContent='none';return;}
    let la0=90,la1=-90,r0=Infinity,r1=0,a0=180,a1=-180,b0=360,b1=0;
    for(const i of idx){const la=D.lat[i],lo=D.lon[i],rr=D.r[i],l2=lo<0?lo+360:lo;
      la0=Math.min(la0,la);la1=Math.max(la1,la);r0=Math.min(r0,rr);r1=Math.max(r1,rr);
      a0=Math.min(a0,lo);a1=Math.max(a1,lo);b0=Math.min(b0,l2);b1=Math.max(b1,l2);}
    let lo0=a0,lo1=a1;  // through +/-180 when that is the narrower box
    if(b1-b0<a1-a0){lo0=b0>180?b0-360:b0;lo1=b1>180?b1-360:b1;}
    // the page holds rounded values: widen by the rounding so the box holds every selected token
    la0=Math.max(-90,la0-0.001);la1=Math.min(90,la1+0.001);r0=Math.max(0,r0-1e-5);r1=r1+1e-5;
    lo0=lo0-0.001<-180?lo0-0.001+360:lo0-0.001;lo1=lo1+0.001>180?lo1+0.001-360:lo1+0.001;
    ns.textContent=idx.length+' tokens';
    out.textContent='bbox.lat_min='+fmt(la0)+' bbox.lat_max='+fmt(la1)+' bbox.lon_min='+fmt(lo0)+' bbox.lon_max='+fmt(lo1)+' bbox.r_min='+fmt(r0)+' bbox.r_max='+fmt(r1);});
  window.skyTimes={start:T0,built:T1-T0,plotted:performance.now()-T1};window.skyReady=true;});
window.skyHammer=hammer;window.skyData=D;
})();
</script>
</body></html>
"""
